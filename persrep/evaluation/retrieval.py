"""Retrieval: an instance's test photos query the training photos of every instance.

Protocol (the paper's; ../shared/docs/REFERENCE.md, not in this repository): queries = the
instance's test images; gallery = the training images of all instances (PODS: 300); each query ranks
the whole gallery by cosine similarity; a gallery image is relevant iff it belongs to the instance.
Per query: NDCG over the full ranking (binary relevance), reciprocal rank, average precision,
recall@k and hit@k (see :mod:`persrep.evaluation.metrics` for exact definitions and tie handling);
each metric is averaged over the instance's queries ("mrr", "ndcg", "map", ...). Per scene: the same
averages over the queries taken in that scene (the gallery does not change).

Deviation from the released code: it reports only top-10 accuracy (our ``hit@10``), MRR and
NDCG; recall@k and mAP are additions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from persrep.evaluation.features import cosine_similarity_matrix
from persrep.evaluation.metrics import (average_precision_rows, hit_at_k_rows, ndcg_rows,
                                        recall_at_k_rows, reciprocal_rank_rows)
from persrep.evaluation.records import ALL_SCENES, Score

__all__ = ["TASK", "DEFAULT_KS", "per_query_metrics", "evaluate_retrieval"]

TASK = "retrieval"
DEFAULT_KS = (1, 5, 10)


def per_query_metrics(query_embeddings: np.ndarray, gallery_embeddings: np.ndarray,
                      gallery_labels: np.ndarray, instance: int,
                      ks: Sequence[int] = DEFAULT_KS) -> dict[str, np.ndarray]:
    """Metric name -> ``[Q]`` values, one per query (``nan`` if the gallery lacks the instance)."""
    gallery_labels = np.asarray(gallery_labels)
    if len(gallery_labels) != len(gallery_embeddings):
        raise ValueError(f"{len(gallery_labels)} gallery labels for {len(gallery_embeddings)} "
                         "gallery embeddings")
    sims = cosine_similarity_matrix(query_embeddings, gallery_embeddings)
    relevant = np.broadcast_to(gallery_labels == instance, sims.shape)
    out = {"ndcg": ndcg_rows(relevant, sims),
           "mrr": reciprocal_rank_rows(relevant, sims),
           "map": average_precision_rows(relevant, sims)}
    for k in ks:
        out[f"recall@{k}"] = recall_at_k_rows(relevant, sims, k)
        out[f"hit@{k}"] = hit_at_k_rows(relevant, sims, k)
    return out


def _mean(values: np.ndarray) -> float:
    # a query without relevant gallery items is undefined (nan) for every query of the instance
    return float(np.mean(values)) if len(values) else float("nan")


def evaluate_retrieval(
    query_embeddings: np.ndarray,
    gallery_embeddings: np.ndarray,
    gallery_labels: np.ndarray,
    instance: int,
    query_scenes: np.ndarray | None = None,
    ks: Sequence[int] = DEFAULT_KS,
) -> list[Score]:
    """Retrieval metrics of one instance, averaged over its queries, overall and per scene.

    Args:
        query_embeddings: ``[Q, D]`` the instance's test embeddings (Q >= 1).
        gallery_embeddings: ``[G, D]`` training embeddings of all instances.
        gallery_labels: ``[G]`` instance index of each gallery image.
        instance: the instance index.
        query_scenes: optional ``[Q]`` scene of each query.
    """
    if len(query_embeddings) == 0:
        raise ValueError(f"instance {instance} has no test images to use as queries")
    per_query = per_query_metrics(query_embeddings, gallery_embeddings, gallery_labels,
                                  instance, ks)
    results = [Score(TASK, name, _mean(v), ALL_SCENES) for name, v in per_query.items()]
    if query_scenes is None:
        return results
    scenes = np.asarray(query_scenes)
    if len(scenes) != len(query_embeddings):
        raise ValueError(f"{len(scenes)} scene labels for {len(query_embeddings)} queries")
    for scene in sorted(set(scenes.tolist())):
        sel = scenes == scene
        results += [Score(TASK, name, _mean(v[sel]), str(scene)) for name, v in per_query.items()]
    return results
