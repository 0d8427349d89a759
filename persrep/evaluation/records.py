"""The two things a task can return: a score, or a stated reason why it did not run.

Tasks return :class:`Score` / :class:`Skipped` values; :func:`to_rows` turns them into tidy rows
``(instance, category, task, metric, scene, value, status, reason, **keys)`` for
:mod:`persrep.evaluation.aggregate`. A skipped task is a row too (``status="skipped"``,
``value=nan``), so a missing number is always visible in the results and never silent.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["ALL_SCENES", "Score", "Skipped", "to_rows", "ROW_COLUMNS"]

ALL_SCENES = "all"
ROW_COLUMNS = ("instance", "category", "task", "metric", "scene", "value", "status", "reason")


@dataclass(frozen=True)
class Score:
    task: str
    metric: str
    value: float
    scene: str = ALL_SCENES


@dataclass(frozen=True)
class Skipped:
    task: str
    reason: str


def to_rows(instance: str, category: str, results: Iterable[Score | Skipped],
            keys: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Tidy rows for one instance; ``keys`` (backbone, adapter_key, ...) are added to each row."""
    keys = dict(keys or {})
    clash = set(keys) & set(ROW_COLUMNS)
    if clash:
        raise ValueError(f"caller keys {sorted(clash)} clash with result columns {ROW_COLUMNS}")
    rows = []
    for r in results:
        if isinstance(r, Score):
            row = {"instance": instance, "category": category, "task": r.task,
                   "metric": r.metric, "scene": r.scene, "value": float(r.value),
                   "status": "ok", "reason": None}
        elif isinstance(r, Skipped):
            row = {"instance": instance, "category": category, "task": r.task,
                   "metric": None, "scene": ALL_SCENES, "value": math.nan,
                   "status": "skipped", "reason": r.reason}
        else:
            raise TypeError(f"a task returned {type(r).__name__}; expected Score or Skipped")
        row.update(keys)
        rows.append(row)
    return rows
