"""Ranking metrics against scikit-learn (random cases) and hand-computed values (edge cases)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, ndcg_score, roc_auc_score

from persrep.evaluation import metrics as M


def _random_case(rng: np.random.Generator, n: int, tied: bool):
    labels = rng.integers(0, 2, n)
    # integer scores on a small range force many ties; normal scores have none
    scores = rng.integers(0, 4, n).astype(float) if tied else rng.normal(size=n)
    return labels, scores


# ---------------------------------------------------------------------------------------------
# oracles: scikit-learn
@pytest.mark.parametrize("tied", [False, True])
def test_average_precision_and_roc_auc_match_sklearn(tied):
    rng = np.random.default_rng(7 + tied)
    checked = 0
    for _ in range(400):
        labels, scores = _random_case(rng, int(rng.integers(2, 40)), tied)
        if labels.min() == labels.max():
            continue
        assert M.average_precision(labels, scores) == pytest.approx(
            average_precision_score(labels, scores), abs=1e-12)
        assert M.roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
        checked += 1
    assert checked > 300


@pytest.mark.parametrize("tied", [False, True])
def test_ndcg_rows_match_sklearn_per_row(tied):
    rng = np.random.default_rng(11 + tied)
    for _ in range(60):
        q, g = int(rng.integers(1, 8)), int(rng.integers(2, 50))
        rel = rng.integers(0, 2, (q, g))
        rel[:, 0] = 1  # sklearn scores all-irrelevant rows 0 where we return nan
        scores = rng.integers(0, 3, (q, g)).astype(float) if tied else rng.normal(size=(q, g))
        ours = M.ndcg_rows(rel, scores)
        theirs = [ndcg_score(rel[i : i + 1], scores[i : i + 1]) for i in range(q)]
        np.testing.assert_allclose(ours, theirs, atol=1e-12)


def test_average_precision_rows_match_sklearn_per_row():
    rng = np.random.default_rng(3)
    rel = rng.integers(0, 2, (30, 25))
    rel[:, 0] = 1
    scores = rng.integers(0, 5, (30, 25)).astype(float)
    expected = [average_precision_score(rel[i], scores[i]) for i in range(30)]
    np.testing.assert_allclose(M.average_precision_rows(rel, scores), expected, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# oracle for the pessimistic rank metrics: explicit per-item ranks
def _relevant_pessimistic_ranks(rel: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """1-based rank of each relevant item when ties place non-relevant items first."""
    ranks = []
    for j in np.flatnonzero(rel == 1):
        higher = np.sum(scores > scores[j])
        tied_irrelevant = np.sum((scores == scores[j]) & (rel == 0))
        tied_relevant_before = np.sum((scores[:j] == scores[j]) & (rel[:j] == 1))
        ranks.append(higher + tied_irrelevant + tied_relevant_before + 1)
    return np.array(ranks)


@pytest.mark.parametrize("tied", [False, True])
def test_rank_metrics_match_explicit_rank_oracle(tied):
    rng = np.random.default_rng(5 + tied)
    q, g = 40, 20
    rel = rng.integers(0, 2, (q, g))
    rel[:, -1] = 1
    scores = rng.integers(0, 3, (q, g)).astype(float) if tied else rng.normal(size=(q, g))
    rr = M.reciprocal_rank_rows(rel, scores)
    for k in (1, 3, 5, 10):
        rec, hit = M.recall_at_k_rows(rel, scores, k), M.hit_at_k_rows(rel, scores, k)
        for i in range(q):
            ranks = _relevant_pessimistic_ranks(rel[i], scores[i])
            assert rec[i] == pytest.approx(np.mean(ranks <= k))
            assert hit[i] == float(ranks.min() <= k)
            assert rr[i] == pytest.approx(1.0 / ranks.min())


# ---------------------------------------------------------------------------------------------
# hand-computed cases
def test_hand_computed_values():
    # P@1 = 1, P@3 = 2/3 -> AP = 5/6; positive pairs won: 2 of 2
    assert M.average_precision([1, 0, 1], [0.9, 0.8, 0.7]) == pytest.approx(5 / 6)
    assert M.roc_auc([1, 0, 1], [0.9, 0.8, 0.7]) == pytest.approx(0.5)
    # single positive at rank 2
    labels, scores = [0, 1, 0, 0], [0.9, 0.8, 0.1, 0.2]
    assert M.average_precision(labels, scores) == pytest.approx(0.5)
    assert M.roc_auc(labels, scores) == pytest.approx(2 / 3)
    assert M.ndcg(labels, scores) == pytest.approx(1 / math.log2(3))
    rel, sc = np.array([labels]), np.array([scores])
    assert M.reciprocal_rank_rows(rel, sc)[0] == pytest.approx(0.5)
    assert M.hit_at_k_rows(rel, sc, 1)[0] == 0.0
    assert M.hit_at_k_rows(rel, sc, 2)[0] == 1.0


def test_ties_are_one_threshold_for_ap_and_averaged_for_ndcg():
    assert M.average_precision([1, 0], [0.5, 0.5]) == pytest.approx(0.5)
    assert M.roc_auc([1, 0], [0.5, 0.5]) == pytest.approx(0.5)
    # tie group of 2 with mean gain 1/2 over discounts 1 and 1/log2(3); ideal DCG is 1
    assert M.ndcg([1, 0], [0.5, 0.5]) == pytest.approx(0.5 * (1 + 1 / math.log2(3)))
    # a relevant item tied with a better irrelevant one: AP counts them together
    assert M.average_precision([0, 1, 1], [0.9, 0.9, 0.1]) == pytest.approx(
        0.5 * 0.5 + 0.5 * (2 / 3))


def test_pessimistic_ties_for_rank_metrics():
    rel, scores = np.array([[1, 0, 0]]), np.zeros((1, 3))
    assert M.reciprocal_rank_rows(rel, scores)[0] == pytest.approx(1 / 3)
    assert M.hit_at_k_rows(rel, scores, 2)[0] == 0.0
    assert M.recall_at_k_rows(rel, scores, 3)[0] == 1.0
    two = np.array([[1, 0, 1, 0]]), np.array([[4.0, 3.0, 2.0, 1.0]])
    assert M.recall_at_k_rows(*two, 1)[0] == 0.5
    assert M.recall_at_k_rows(*two, 3)[0] == 1.0


def test_all_positives():
    assert M.average_precision([1, 1, 1], [0.1, 0.5, 0.2]) == 1.0
    assert math.isnan(M.roc_auc([1, 1, 1], [0.1, 0.5, 0.2]))
    assert M.ndcg([1, 1, 1], [0.1, 0.5, 0.2]) == pytest.approx(1.0)
    rel, sc = np.ones((1, 3)), np.array([[0.1, 0.5, 0.2]])
    assert M.reciprocal_rank_rows(rel, sc)[0] == 1.0
    assert M.recall_at_k_rows(rel, sc, 2)[0] == pytest.approx(2 / 3)


def test_no_positives_is_nan_everywhere():
    labels, scores = [0, 0, 0], [0.3, 0.2, 0.1]
    assert math.isnan(M.average_precision(labels, scores))
    assert math.isnan(M.roc_auc(labels, scores))
    assert math.isnan(M.ndcg(labels, scores))
    rel, sc = np.zeros((2, 3)), np.ones((2, 3))
    for values in (M.reciprocal_rank_rows(rel, sc), M.recall_at_k_rows(rel, sc, 1),
                   M.hit_at_k_rows(rel, sc, 1), M.ndcg_rows(rel, sc),
                   M.average_precision_rows(rel, sc)):
        assert np.isnan(values).all()


def test_invalid_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="binary"):
        M.average_precision([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="shape"):
        M.roc_auc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        M.average_precision([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match="k must be"):
        M.recall_at_k_rows(np.ones((1, 2)), np.ones((1, 2)), 0)
