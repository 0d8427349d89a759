import math

import numpy as np
import torch

from persrep.contrastive.losses import InfoNCELoss, build_loss, info_nce


def reference_loop(q, p, n, t):
    """The released code's loop (cross-entropy per positive), transcribed in float64 numpy."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    p = p / np.linalg.norm(p, axis=1, keepdims=True)
    n = n / np.linalg.norm(n, axis=1, keepdims=True)
    total = 0.0
    for j in range(len(p)):
        per_query = []
        for i in range(len(q)):
            logits = np.concatenate([[q[i] @ p[j]], n @ q[i]]) / t
            m = logits.max()
            per_query.append(-(logits[0] - (m + math.log(np.exp(logits - m).sum()))))
        total += np.mean(per_query)
    return total / len(p)


def test_matches_float64_reference_on_random_batches():
    rng = np.random.default_rng(0)
    for trial in range(20):
        b, k, d = rng.integers(1, 9), rng.integers(1, 9), rng.integers(2, 17)
        q, p, n = (rng.normal(size=(b, d)) for _ in range(3))
        n = rng.normal(size=(k, d))
        t = float(rng.choice([0.07, 0.5, 1.0]))
        ours = info_nce(*(torch.from_numpy(x) for x in (q, p, n)), temperature=t).item()
        assert math.isclose(ours, reference_loop(q, p, n, t), rel_tol=1e-10, abs_tol=1e-12), trial


def test_hand_computed_case():
    # orthonormal 2-D: q = e1, p = e1 (sim 1), n = e2 (sim 0), t = 1 -> -log(e / (e + 1))
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    p = torch.tensor([[2.0, 0.0]], dtype=torch.float64)  # normalised inside
    n = torch.tensor([[0.0, 3.0]], dtype=torch.float64)
    expected = -math.log(math.e / (math.e + 1.0))
    assert math.isclose(info_nce(q, p, n, 1.0).item(), expected, rel_tol=1e-12)


def test_batch_of_one_and_gradient_direction():
    q = torch.tensor([[1.0, 0.2]], requires_grad=True)
    p = torch.tensor([[0.0, 1.0]])
    n = torch.tensor([[1.0, 0.0]])
    loss = info_nce(q, p, n, 0.1)
    loss.backward()
    # moving q toward p (increase y) and away from n (decrease x) must lower the loss
    assert q.grad[0, 1] < 0 and q.grad[0, 0] > 0


def test_symmetric_variant():
    rng = torch.Generator().manual_seed(0)
    a, p, n = (torch.randn(4, 8, generator=rng, dtype=torch.float64) for _ in range(3))
    sym = InfoNCELoss(0.2, symmetric=True)(a, p, n)
    expected = 0.5 * (info_nce(a, p, n, 0.2) + info_nce(p, a, n, 0.2))
    assert torch.allclose(sym, expected)
    assert not torch.allclose(sym, info_nce(a, p, n, 0.2))
    assert build_loss("infonce_symmetric", 0.2).symmetric


# ---- triplets ---------------------------------------------------------------------------------
import pytest  # noqa: E402

from persrep.contrastive.triplets import TripletError, sample_triplets  # noqa: E402


def test_triplets_deterministic_and_drawn_from_the_right_pools():
    anchors, pos, neg = ["r0", "r1", "r2"], [f"s{i}" for i in range(50)], [f"n{i}" for i in range(20)]
    t1 = sample_triplets(anchors, pos, neg, num_triplets=500, num_positives=10, seed=1234)
    assert t1 == sample_triplets(anchors, pos, neg, num_triplets=500, num_positives=10, seed=1234)
    assert t1 != sample_triplets(anchors, pos, neg, num_triplets=500, num_positives=10, seed=1)
    assert len(t1) == 500
    assert {a for a, _, _ in t1} == set(anchors)
    assert len({p for _, p, _ in t1}) == 10 and {p for _, p, _ in t1} <= set(pos)  # cut to num_positives
    assert {n for _, _, n in t1} <= set(neg) and len({n for _, _, n in t1}) == 20
    # with replacement: roughly uniform anchors
    counts = np.bincount([anchors.index(a) for a, _, _ in t1])
    assert counts.min() > 120


def test_triplets_real_only_and_errors():
    with pytest.raises(TripletError, match="no positives"):  # never a silent switch to real-only
        sample_triplets(["r0", "r1"], [], ["n"], 10, 5, 0)
    t = sample_triplets(["r0", "r1"], ["r0", "r1"], ["n"], 10, 5, 0)  # real-only: said explicitly
    assert {p for _, p, _ in t} <= {"r0", "r1"}
    with pytest.raises(TripletError, match="no negatives"):
        sample_triplets(["r0"], ["s"], [], 10, 5, 0)
    with pytest.raises(TripletError, match="no anchors"):
        sample_triplets([], ["s"], ["n"], 10, 5, 0)
