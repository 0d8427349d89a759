"""Ranking metrics with binary relevance: AP, ROC-AUC, NDCG, MRR, recall@k, hit@k.

Pure numpy. The ``*_rows`` functions take ``[Q, G]`` matrices (one query per row, every row the
same gallery) and are vectorised over rows; the scalar functions are the one-row case.

Definitions (chosen to match scikit-learn where scikit-learn has the metric):

- ``average_precision``: ``sum_n (R_n - R_{n-1}) P_n`` over the distinct score thresholds,
  exactly ``sklearn.metrics.average_precision_score``. Tied scores form one threshold, so a
  tied group counts as retrieved all at once.
- ``roc_auc``: the Mann-Whitney statistic with tied (positive, negative) pairs counting 1/2,
  exactly ``sklearn.metrics.roc_auc_score``.
- ``ndcg_rows``: linear gain = relevance, discount ``1/log2(rank+1)``, full ranking (no cut-off),
  ties averaged over all orderings of the tied group, exactly ``sklearn.metrics.ndcg_score``
  with ``k=None, ignore_ties=False``.
- ``reciprocal_rank_rows``, ``recall_at_k_rows``, ``hit_at_k_rows``: scikit-learn has no
  equivalent. Ties are broken *against* the relevant items (pessimistic), so a degenerate
  model that scores everything equally earns no credit. With continuous cosine scores ties
  are practically absent and the choice does not matter.
  ``recall@k`` = fraction of the query's relevant items within the first k;
  ``hit@k`` = 1 if any relevant item is within the first k (the reference code's "top-k acc").

Edge cases, explicit rather than warnings:
- no positives (no relevant item) -> ``nan`` for every metric: the metric is undefined, and a
  ``nan`` is dropped (and counted) by aggregation instead of silently reading as 0
  (scikit-learn returns 0 for AP/NDCG here and raises for ROC-AUC);
- all positives -> AP = 1, NDCG = 1, MRR = 1, recall@k = min(k, P)/P; ROC-AUC = ``nan``
  (no negatives to rank against);
- NaN/inf scores, non-binary labels or mismatched shapes -> ``ValueError``.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "average_precision",
    "average_precision_rows",
    "roc_auc",
    "ndcg",
    "ndcg_rows",
    "reciprocal_rank_rows",
    "recall_at_k_rows",
    "hit_at_k_rows",
]


# ---------------------------------------------------------------------------------------------
# input checks
def _as_binary(labels: np.ndarray, name: str = "labels") -> np.ndarray:
    arr = np.asarray(labels)
    if arr.dtype == bool:
        return arr.astype(np.float64)
    if arr.size and not np.isin(arr, (0, 1)).all():
        bad = np.unique(arr[~np.isin(arr, (0, 1))])[:5]
        raise ValueError(f"{name} must be binary (0/1 or bool); found values {bad.tolist()}")
    return arr.astype(np.float64)


def _check_pair(labels, scores, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    rel = _as_binary(labels)
    sc = np.asarray(scores, dtype=np.float64)
    if rel.shape != sc.shape:
        raise ValueError(f"labels shape {rel.shape} != scores shape {sc.shape}")
    if sc.ndim != ndim:
        raise ValueError(f"expected {ndim}-d labels/scores, got shape {sc.shape}")
    if not np.isfinite(sc).all():
        raise ValueError("scores contain NaN or inf: rank only finite scores")
    return rel, sc


# ---------------------------------------------------------------------------------------------
# tie structure of a descending sort
def _sort_descending(relevance: np.ndarray, scores: np.ndarray, pessimistic: bool):
    """Sort each row by score, descending; return sorted (relevance, scores).

    ``pessimistic`` puts non-relevant items first inside a tie, otherwise the order inside a tie
    is irrelevant to the caller (tie-grouped metrics).
    """
    if pessimistic:
        # lexsort: last key is primary -> score descending, then relevance ascending
        order = np.lexsort((relevance, -scores), axis=-1)
    else:
        order = np.argsort(-scores, axis=-1, kind="stable")
    return np.take_along_axis(relevance, order, -1), np.take_along_axis(scores, order, -1)


def _tie_group_bounds(sorted_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each position of row-wise sorted scores: index of its tie group's first/last item."""
    q, g = sorted_scores.shape
    idx = np.broadcast_to(np.arange(g), (q, g))
    new_group = np.ones((q, g), dtype=bool)
    new_group[:, 1:] = sorted_scores[:, 1:] != sorted_scores[:, :-1]
    group_end = np.ones((q, g), dtype=bool)
    group_end[:, :-1] = new_group[:, 1:]
    start = np.maximum.accumulate(np.where(new_group, idx, 0), axis=1)
    end = np.minimum.accumulate(np.where(group_end, idx, g)[:, ::-1], axis=1)[:, ::-1]
    return start, end


# ---------------------------------------------------------------------------------------------
# tie-grouped metrics (scikit-learn semantics)
def average_precision_rows(relevance, scores) -> np.ndarray:
    """Average precision of each row (``[Q, G]`` -> ``[Q]``); ``nan`` for rows without positives."""
    rel, sc = _check_pair(relevance, scores, 2)
    if sc.shape[1] == 0:
        return np.full(sc.shape[0], np.nan)
    r, s = _sort_descending(rel, sc, pessimistic=False)
    _, end = _tie_group_bounds(s)
    tp = np.cumsum(r, axis=1)
    precision = tp / np.arange(1, s.shape[1] + 1)
    # every item inherits the precision at the end of its tie group (one threshold per group)
    group_precision = np.take_along_axis(precision, end, 1)
    n_pos = r.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = (r * group_precision).sum(axis=1) / n_pos
    return np.where(n_pos > 0, ap, np.nan)


def average_precision(labels, scores) -> float:
    """One-vs-all average precision (= ``sklearn.metrics.average_precision_score``).

    ``nan`` when there is no positive.
    """
    rel, sc = _check_pair(labels, scores, 1)
    return float(average_precision_rows(rel[None], sc[None])[0])


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ascending ranks, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="stable")
    v = values[order]
    start, end = _tie_group_bounds(-v[None])  # ascending ties = descending ties of -v
    ranks = np.empty(len(values))
    ranks[order] = (start[0] + end[0]) / 2.0 + 1.0
    return ranks


def roc_auc(labels, scores) -> float:
    """Area under the ROC curve (= ``sklearn.metrics.roc_auc_score`` for binary labels).

    Computed as the Mann-Whitney U statistic with average ranks (ties count 1/2).
    ``nan`` when there is no positive or no negative.
    """
    rel, sc = _check_pair(labels, scores, 1)
    n_pos = rel.sum()
    n_neg = len(rel) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(sc)
    u = ranks[rel == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _discounts(n: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(n) + 2.0)


def ndcg_rows(relevance, scores) -> np.ndarray:
    """NDCG over the full ranking of each row (= ``sklearn.metrics.ndcg_score`` per sample).

    Tied items share the mean gain of their tie group (average over all orderings of the tie).
    ``nan`` for rows without any relevant item.
    """
    rel, sc = _check_pair(relevance, scores, 2)
    q, g = sc.shape
    if g == 0:
        return np.full(q, np.nan)
    r, s = _sort_descending(rel, sc, pessimistic=False)
    start, end = _tie_group_bounds(s)
    cum = np.concatenate([np.zeros((q, 1)), np.cumsum(r, axis=1)], axis=1)
    group_gain = np.take_along_axis(cum, end + 1, 1) - np.take_along_axis(cum, start, 1)
    mean_gain = group_gain / (end - start + 1)
    disc = _discounts(g)
    dcg = (mean_gain * disc).sum(axis=1)
    # ideal DCG for binary relevance: all P relevant items first
    n_pos = r.sum(axis=1).astype(int)
    disc_cum = np.concatenate([[0.0], np.cumsum(disc)])
    idcg = disc_cum[n_pos]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = dcg / idcg
    return np.where(n_pos > 0, out, np.nan)


def ndcg(relevance, scores) -> float:
    """NDCG of one ranking (1-d relevance and scores); ``nan`` without relevant items."""
    rel, sc = _check_pair(relevance, scores, 1)
    return float(ndcg_rows(rel[None], sc[None])[0])


# ---------------------------------------------------------------------------------------------
# rank-position metrics (pessimistic tie-breaking)
def _pessimistic_sorted_relevance(relevance, scores) -> np.ndarray:
    rel, sc = _check_pair(relevance, scores, 2)
    r, _ = _sort_descending(rel, sc, pessimistic=True)
    return r


def reciprocal_rank_rows(relevance, scores) -> np.ndarray:
    """1 / rank of the first relevant item per row (mean over rows = MRR); ``nan`` if none."""
    r = _pessimistic_sorted_relevance(relevance, scores)
    has_pos = r.any(axis=1)
    first = np.argmax(r > 0, axis=1)
    return np.where(has_pos, 1.0 / (first + 1.0), np.nan)


def recall_at_k_rows(relevance, scores, k: int) -> np.ndarray:
    """Fraction of each row's relevant items ranked within the first ``k``; ``nan`` if none."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    r = _pessimistic_sorted_relevance(relevance, scores)
    n_pos = r.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = r[:, :k].sum(axis=1) / n_pos
    return np.where(n_pos > 0, out, np.nan)


def hit_at_k_rows(relevance, scores, k: int) -> np.ndarray:
    """1.0 if any relevant item is ranked within the first ``k`` (top-k accuracy); ``nan`` if none."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    r = _pessimistic_sorted_relevance(relevance, scores)
    has_pos = r.any(axis=1)
    return np.where(has_pos, r[:, :k].any(axis=1).astype(np.float64), np.nan)
