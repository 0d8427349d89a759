"""Evaluation tasks as data: what each needs, its metrics, its headline metric, how it scores.

Every task is a :class:`TaskSpec` in :data:`persrep.registry.TASKS`. A *global* task scores one
instance from the global embeddings (:class:`GlobalInput`) with its ``evaluate`` function; the
*dense* tasks (detection, segmentation) share one prediction pass over the dense pool
(:func:`persrep.evaluation.dense_task.evaluate_dense`), so they carry no function. Settings
(``evaluation.tasks``), the suite, pre-flight (does the run need the dense pool?) and the sweep's
metric check read these specs instead of lists of names.

A new global task: one module that calls :func:`register_task` with a spec and an ``evaluate``
function (``tests/test_registry_extension.py`` adds one and runs it through the pipeline).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from persrep.registry import TASKS


@dataclass(frozen=True)
class GlobalInput:
    """What a global task scores one instance from."""

    instance: int  # index into the pools' labels
    pool: Any  # persrep.evaluation.suite.GlobalPool
    train: np.ndarray  # the instance's own training embeddings [k, D]
    own_test: np.ndarray  # bool [N]: the test images of this instance
    scene_negatives: Any
    ks: Sequence[int]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    dense: bool  # needs the dense pool (test_dense + masks)
    metrics: tuple[str, ...]  # what it reports (the sweep's objective must be one of them)
    headline: str  # its metric in the summary table
    evaluate: Callable[[GlobalInput], list[Any]] | None = None  # global tasks: Score / Skipped records


def register_task(spec: TaskSpec) -> TaskSpec:
    if not spec.dense and spec.evaluate is None:
        raise TypeError(f"task {spec.name!r}: a global task needs an evaluate function")
    return TASKS.add(spec.name, spec)


def task_spec(name: str) -> TaskSpec:
    return TASKS.get(name)


def dense_tasks(tasks: Sequence[str]) -> list[str]:
    """The tasks among ``tasks`` that need the dense pool, in order."""
    return [t for t in tasks if task_spec(t).dense]


def _classification(x: GlobalInput) -> list[Any]:
    from persrep.evaluation.classification import evaluate_classification

    return evaluate_classification(x.pool.test_embeddings, x.pool.test_labels, x.train, x.instance,
                                   x.pool.test_scenes, x.scene_negatives)


def _retrieval(x: GlobalInput) -> list[Any]:
    from persrep.evaluation.retrieval import evaluate_retrieval

    scenes = None if x.pool.test_scenes is None else np.asarray(x.pool.test_scenes)[x.own_test]
    return evaluate_retrieval(np.asarray(x.pool.test_embeddings)[x.own_test], x.pool.train_embeddings,
                              x.pool.train_labels, x.instance, scenes, x.ks)


BUILTIN = (
    TaskSpec("classification", False, ("ap", "roc_auc"), "ap", _classification),
    TaskSpec("retrieval", False, ("ndcg", "mrr", "map", "recall@1", "recall@5", "recall@10",
                                  "hit@1", "hit@5", "hit@10"), "ndcg", _retrieval),
    TaskSpec("detection", True, ("map", "map50", "f1_50"), "map"),
    TaskSpec("segmentation", True, ("map", "map50", "f1_50", "mean_iou"), "map"),
)
for _spec in BUILTIN:
    register_task(_spec)
