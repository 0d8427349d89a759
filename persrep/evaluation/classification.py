"""One-vs-all classification of one instance against the whole test pool.

Protocol (the paper's; ../shared/docs/REFERENCE.md, not in this repository): every test image of
every instance is scored by its *maximum* cosine similarity to the instance's training embeddings (3
real images); the instance's own test images are positives, every other image is a negative.
Metrics: average precision (reported as PR-AUC in the paper) and ROC-AUC.

Per-scene breakdown (PODS scenes such as ``pose`` or ``distractors``): AP/ROC-AUC computed on
the instance's positives *in that scene* against negatives chosen by ``scene_negatives``:

- ``"all"`` (default): every negative in the pool, whatever its scene. The negatives then stay
  the same for every scene, so differences between scenes reflect only how hard the
  instance's own photos are to recognise in that scene.
- ``"same_scene"``: only negatives from the same scene (a self-contained per-scene pool; hard
  distractor scenes then also get harder negatives).

Scenes in which the instance has no test image are left out (no rows), not reported as nan.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from persrep.evaluation.features import cosine_similarity_matrix
from persrep.evaluation.metrics import average_precision, roc_auc
from persrep.evaluation.records import ALL_SCENES, Score

__all__ = ["TASK", "instance_scores", "evaluate_classification"]

TASK = "classification"
SceneNegatives = Literal["all", "same_scene"]


def instance_scores(test_embeddings: np.ndarray, train_embeddings: np.ndarray) -> np.ndarray:
    """Score of each test image: max cosine to the instance's train embeddings (``[N]``)."""
    train = np.asarray(train_embeddings)
    if train.ndim != 2 or len(train) == 0:
        raise ValueError(f"need at least one train embedding [K, D], got shape {train.shape}")
    return cosine_similarity_matrix(test_embeddings, train).max(axis=1)


def _metrics(is_positive: np.ndarray, scores: np.ndarray, scene: str) -> list[Score]:
    return [Score(TASK, "ap", average_precision(is_positive, scores), scene),
            Score(TASK, "roc_auc", roc_auc(is_positive, scores), scene)]


def evaluate_classification(
    test_embeddings: np.ndarray,
    test_labels: np.ndarray,
    train_embeddings: np.ndarray,
    instance: int,
    test_scenes: np.ndarray | None = None,
    scene_negatives: SceneNegatives = "all",
) -> list[Score]:
    """AP and ROC-AUC of ``instance`` over the pool, overall and per scene.

    Args:
        test_embeddings: ``[N, D]`` global embeddings of the whole test pool.
        test_labels: ``[N]`` instance index of each test image.
        train_embeddings: ``[K, D]`` the instance's training embeddings.
        instance: the instance index whose images are the positives.
        test_scenes: optional ``[N]`` scene name of each test image.
        scene_negatives: ``"all"`` or ``"same_scene"`` (see the module docstring).
    """
    labels = np.asarray(test_labels)
    if len(labels) != len(test_embeddings):
        raise ValueError(f"{len(labels)} test labels for {len(test_embeddings)} test embeddings")
    if scene_negatives not in ("all", "same_scene"):
        raise ValueError(f"scene_negatives must be 'all' or 'same_scene', got {scene_negatives!r}")
    scores = instance_scores(test_embeddings, train_embeddings)
    positive = labels == instance
    results = _metrics(positive, scores, ALL_SCENES)
    if test_scenes is None:
        return results
    scenes = np.asarray(test_scenes)
    if len(scenes) != len(labels):
        raise ValueError(f"{len(scenes)} scene labels for {len(labels)} test images")
    for scene in sorted(set(scenes[positive].tolist())):
        in_scene = scenes == scene
        negatives = ~positive if scene_negatives == "all" else ~positive & in_scene
        keep = (positive & in_scene) | negatives
        results += _metrics(positive[keep], scores[keep], str(scene))
    return results
