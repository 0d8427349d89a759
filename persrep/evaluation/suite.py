"""The evaluation suite: every task for one instance, or for many, as tidy rows.

Inputs are precomputed features, not models: a :class:`GlobalPool` (global embeddings of the
test pool and of every instance's training images) and, for the dense tasks, a
:class:`~persrep.evaluation.dense_task.DensePool` plus each instance's
:class:`~persrep.evaluation.dense_task.DenseTrainSet`. Build them with the ``embed_*`` helpers
and one :class:`~persrep.evaluation.cache.EmbeddingCache`, so a pool is embedded once per
extractor: once for a pretrained backbone shared by all instances, once per adapter for
personalised backbones (pass a callable ``instance -> pool`` to :func:`evaluate_all`).

Every requested task yields either scores or a ``skipped`` row with its reason.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from persrep.evaluation.cache import EmbeddingCache
from persrep.evaluation.classification import SceneNegatives
from persrep.evaluation.dense import Combine
from persrep.evaluation.dense_task import DensePool, DenseTrainSet, evaluate_dense
from persrep.evaluation.features import FeatureExtractor
from persrep.evaluation.records import Score, Skipped, to_rows
from persrep.evaluation.retrieval import DEFAULT_KS
from persrep.evaluation.tasks import BUILTIN, GlobalInput, dense_tasks, task_spec
from persrep.registry import TASKS

__all__ = ["ALL_TASKS", "GlobalPool", "evaluate_instance", "evaluate_all",
           "embed_global_pool", "embed_dense_pool", "dense_train_sets"]

ALL_TASKS = tuple(s.name for s in BUILTIN)  # the built-in tasks (persrep/evaluation/tasks.py)
T = TypeVar("T")
PerInstance = T | Callable[[int], T]


@dataclass(frozen=True)
class GlobalPool:
    """Global embeddings of the whole evaluation pool for one extractor."""

    test_embeddings: np.ndarray  # [N, D] every instance's test images
    test_labels: np.ndarray  # [N] instance index
    train_embeddings: np.ndarray  # [M, D] every instance's training images (retrieval gallery)
    train_labels: np.ndarray  # [M]
    test_scenes: np.ndarray | None = None  # [N] scene names, for per-scene breakdowns

    def __post_init__(self):
        if len(self.test_embeddings) != len(self.test_labels):
            raise ValueError(f"{len(self.test_embeddings)} test embeddings for "
                             f"{len(self.test_labels)} test labels")
        if len(self.train_embeddings) != len(self.train_labels):
            raise ValueError(f"{len(self.train_embeddings)} train embeddings for "
                             f"{len(self.train_labels)} train labels")
        if self.test_scenes is not None and len(self.test_scenes) != len(self.test_labels):
            raise ValueError(f"{len(self.test_scenes)} scenes for {len(self.test_labels)} test "
                             "images")


def _check_tasks(tasks: Sequence[str]) -> list[str]:
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; choose from {TASKS.names()}")
    return list(tasks)


def _global_tasks(instance: int, pool: GlobalPool | None, tasks: list[str],
                  scene_negatives: SceneNegatives, ks: Sequence[int]) -> list[Score | Skipped]:
    # the registry's order (classification, retrieval, then tasks registered later)
    order = [s.name for s in BUILTIN] + [t for t in TASKS.names() if t not in ALL_TASKS]
    wanted = [t for t in order if t in tasks and not task_spec(t).dense]
    if not wanted:
        return []
    if pool is None:
        return [Skipped(t, "no global embeddings supplied") for t in wanted]
    train = np.asarray(pool.train_embeddings)[np.asarray(pool.train_labels) == instance]
    own_test = np.asarray(pool.test_labels) == instance
    if len(train) == 0:
        return [Skipped(t, f"instance {instance} has no training image") for t in wanted]
    if not own_test.any():
        return [Skipped(t, f"instance {instance} has no test image") for t in wanted]
    results: list[Score | Skipped] = []
    x = GlobalInput(instance, pool, train, own_test, scene_negatives, ks)
    for t in wanted:
        results += task_spec(t).evaluate(x)
    return results


def evaluate_instance(
    instance: int,
    name: str,
    category: str,
    global_pool: GlobalPool | None = None,
    dense_pool: DensePool | None = None,
    dense_train: DenseTrainSet | None = None,
    tasks: Sequence[str] = ALL_TASKS,
    keys: Mapping[str, Any] | None = None,
    scene_negatives: SceneNegatives = "all",
    ks: Sequence[int] = DEFAULT_KS,
    dense_combine: Combine = "max_mean",
    morph_radius: int = 1,
) -> list[dict[str, Any]]:
    """Tidy rows of every requested task for one instance (index ``instance`` in the pools).

    ``keys`` (backbone, adapter_key, global_feature, ...) are copied into every row.
    """
    tasks = _check_tasks(tasks)
    results = _global_tasks(instance, global_pool, tasks, scene_negatives, ks)
    if dense_tasks(tasks):
        results += evaluate_dense(instance, dense_pool, dense_train, tasks, dense_combine,
                                  morph_radius)
    return to_rows(name, category, results, keys)


def _resolve(value: PerInstance, instance: int):
    return value(instance) if callable(value) else value


def evaluate_all(
    instance_names: Sequence[str],
    instance_categories: Sequence[str],
    global_pool: PerInstance[GlobalPool | None] = None,
    dense_pool: PerInstance[DensePool | None] = None,
    dense_train: Callable[[int], DenseTrainSet | None] | None = None,
    instances: Sequence[int] | None = None,
    tasks: Sequence[str] = ALL_TASKS,
    keys: PerInstance[Mapping[str, Any] | None] = None,
    progress: Callable[[int, int], None] | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """Rows for many instances (all by default).

    ``global_pool``, ``dense_pool`` and ``keys`` are either shared values or callables
    ``instance -> value`` (personalised backbones: one pool per adapter). ``options`` go to
    :func:`evaluate_instance` (scene_negatives, ks, dense_combine, morph_radius).
    """
    if len(instance_names) != len(instance_categories):
        raise ValueError(f"{len(instance_names)} instance names for "
                         f"{len(instance_categories)} categories")
    chosen = range(len(instance_names)) if instances is None else list(instances)
    rows: list[dict[str, Any]] = []
    for done, i in enumerate(chosen, start=1):
        rows += evaluate_instance(
            i, instance_names[i], instance_categories[i],
            global_pool=_resolve(global_pool, i), dense_pool=_resolve(dense_pool, i),
            dense_train=dense_train(i) if dense_train is not None else None,
            tasks=tasks, keys=_resolve(keys, i), **options)
        if progress is not None:
            progress(done, len(chosen))
    return rows


# ---------------------------------------------------------------------------------------------
# building the inputs with a cache
def embed_global_pool(cache: EmbeddingCache, extractor: FeatureExtractor, extractor_key: str,
                      test_images: Sequence, test_labels: Sequence[int], test_list_key: str,
                      train_images: Sequence, train_labels: Sequence[int], train_list_key: str,
                      test_scenes: Sequence[str] | None = None) -> GlobalPool:
    """Embed (or fetch from ``cache``) the test pool and the training gallery."""
    return GlobalPool(
        cache.global_embeddings(extractor, extractor_key, test_images, test_list_key),
        np.asarray(test_labels),
        cache.global_embeddings(extractor, extractor_key, train_images, train_list_key),
        np.asarray(train_labels),
        None if test_scenes is None else np.asarray(test_scenes))


def embed_dense_pool(cache: EmbeddingCache, extractor: FeatureExtractor, extractor_key: str,
                     images: Sequence, list_key: str, labels: Sequence[int],
                     image_sizes: Sequence[tuple[int, int]],
                     masks: Sequence[np.ndarray | None] | None) -> DensePool:
    """Dense features of the dense pool (``images`` already resized for the dense input)."""
    features = cache.dense_features(extractor, extractor_key, images, list_key)
    return DensePool(features, np.asarray(labels), np.asarray(image_sizes), masks)


def dense_train_sets(train_features: Sequence, train_labels: Sequence[int],
                     train_masks: Sequence[np.ndarray | None] | None
                     ) -> Callable[[int], DenseTrainSet | None]:
    """``instance -> DenseTrainSet`` from the dense features of all training images."""
    labels = np.asarray(train_labels)
    if len(train_features) != len(labels):
        raise ValueError(f"{len(train_features)} training feature maps for {len(labels)} labels")
    if train_masks is not None and len(train_masks) != len(labels):
        raise ValueError(f"{len(train_masks)} training masks for {len(labels)} labels")

    def for_instance(instance: int) -> DenseTrainSet | None:
        idx = np.flatnonzero(labels == instance)
        if len(idx) == 0:
            return None
        masks = [None] * len(idx) if train_masks is None else [train_masks[i] for i in idx]
        return DenseTrainSet([train_features[i] for i in idx], masks)

    return for_instance
