"""Query expansion of persrep find (persrep/find/expand.py) on hand-built embeddings."""

import numpy as np
import pytest

from persrep.find.expand import expanded_references, expansion_sets
from persrep.find.scan import score_pairs


def unit(*v):
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v)


# two objects; A's references all look "front"; the collection holds A from the front (a, b),
# A from another side (c: closer to b than to A's references) and one photo of B (d)
REF = np.stack([unit(1, 0, 0, 0), unit(1, 0.05, 0, 0), unit(0, 0, 1, 0)])
OWNERS = ["A", "A", "B"]
EMB = np.stack([unit(1, 0.1, 0, 0),     # a: A, front
                unit(1, 0.6, 0, 0.1),   # b: A, turned a little
                unit(0.5, 1, 0, 0.2),   # c: A, other side: far from A's refs, near b
                unit(0.1, 0, 1, 0.1)])  # d: B


def test_sets_take_only_hits_best_first_at_most_k():
    score = np.array([0.9, 0.7, 0.8, 0.95, 0.7])
    hit = np.array([True, True, False, False, True])
    assert expansion_sets(score, hit, 2).tolist() == [0, 1]  # 3 and 2 score higher but are no hits
    assert expansion_sets(score, hit, 10).tolist() == [0, 1, 4]  # a tie keeps row order
    assert expansion_sets(score, hit, 0).tolist() == []
    assert expansion_sets(score, np.zeros(5, bool), 3).tolist() == []
    with pytest.raises(ValueError, match="expand"):
        expansion_sets(score, hit, -1)


def test_references_grow_by_each_objects_set_only():
    ref, owners = expanded_references(EMB, REF, OWNERS, {"A": np.array([1, 0]), "B": np.array([3])})
    assert owners == ["A", "A", "B", "A", "A", "B"]
    np.testing.assert_allclose(ref[:3], REF)
    np.testing.assert_allclose(ref[3:], EMB[[1, 0, 3]])
    same, owners = expanded_references(EMB, REF, OWNERS, {})
    assert owners == OWNERS and np.array_equal(same, REF)
    with pytest.raises(ValueError, match="ghost"):
        expanded_references(EMB, REF, OWNERS, {"ghost": np.array([0])})


def test_expansion_lifts_a_photo_like_the_confident_ones():
    pairs = [("m", "A"), ("m", "B")]
    before, _ = score_pairs({"m": EMB}, {"m": (REF, OWNERS)}, pairs)
    sets = {"A": expansion_sets(before[:, 0], before[:, 0] > before[:, 1], 2),
            "B": expansion_sets(before[:, 1], before[:, 1] > before[:, 0], 2)}
    assert sets["A"].tolist() == [0, 1] and sets["B"].tolist() == [3]
    after, rivals = score_pairs({"m": EMB}, {"m": expanded_references(EMB, REF, OWNERS, sets)}, pairs)
    # c, scored by A's three originals, is far below b; with b among A's references it is close to it
    assert before[2, 0] < 0.65 < after[2, 0]
    assert np.all(after >= before - 1e-6)  # a max over more references never falls
    # a photo taken into B's set is 1.0 for B, and B is its rival for A
    assert after[3, 1] == pytest.approx(1.0, abs=1e-6)
    assert rivals[3, 0] == pytest.approx(1.0, abs=1e-6)
