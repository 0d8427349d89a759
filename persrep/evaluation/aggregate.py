"""Tidy result tables: per-instance rows in, means over instances out (pandas).

A results frame has one row per (instance, task, metric, scene) with the columns of
:data:`~persrep.evaluation.records.ROW_COLUMNS` plus caller keys (``backbone``,
``adapter_key``, ``global_feature``, ...). Every column that is not a result column is treated
as a *setting*: summaries group by the settings too, so two backbones in one frame are never
averaged together.

Summaries report ``mean``, ``std`` (sample std, ddof=1; nan for a single instance), ``sem``,
``n`` (instances with a finite value) and ``n_nan`` (instances whose metric is undefined, e.g.
a scene without positives). Skipped rows are excluded from the means and listed by
:func:`skipped_summary`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from persrep.evaluation.records import ROW_COLUMNS
from persrep.evaluation.tasks import BUILTIN

__all__ = ["HEADLINE", "results_frame", "setting_columns", "summarize", "summarize_by_category",
           "skipped_summary"]

# The headline metric per task, as in the paper's tables (the summary table, the report, MLflow)
HEADLINE = {spec.name: spec.headline for spec in BUILTIN}  # the built-in tasks' (evaluation/tasks.py)


def results_frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Rows -> DataFrame with the result columns first (an empty input gives an empty frame)."""
    frame = pd.DataFrame(list(rows))
    if frame.empty:
        return pd.DataFrame(columns=list(ROW_COLUMNS))
    missing = [c for c in ROW_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"result rows lack columns {missing}; build them with records.to_rows")
    extra = [c for c in frame.columns if c not in ROW_COLUMNS]
    frame = frame[list(ROW_COLUMNS) + extra]
    frame["value"] = frame["value"].astype(float)
    return frame


def setting_columns(frame: pd.DataFrame) -> list[str]:
    """The caller-supplied key columns (everything that is not a result column)."""
    return [c for c in frame.columns if c not in ROW_COLUMNS]


def _summarize(frame: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    ok = frame[frame["status"] == "ok"]
    columns = by + ["mean", "std", "sem", "n", "n_nan"]
    if ok.empty:
        return pd.DataFrame(columns=columns)
    grouped = ok.groupby(by, dropna=False, sort=True)["value"]
    out = grouped.agg(mean="mean", std="std", n="count",
                      n_nan=lambda v: int(v.isna().sum())).reset_index()
    out["sem"] = out["std"] / np.sqrt(out["n"].where(out["n"] > 0))
    return out[columns]


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean/std over instances per (settings..., task, metric, scene)."""
    return _summarize(frame, setting_columns(frame) + ["task", "metric", "scene"])


def summarize_by_category(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean/std over instances per (settings..., category, task, metric, scene)."""
    return _summarize(frame, setting_columns(frame) + ["category", "task", "metric", "scene"])


def skipped_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Which (settings..., task, reason) were skipped, and for how many instances."""
    by = setting_columns(frame) + ["task", "reason"]
    skipped = frame[frame["status"] == "skipped"]
    if skipped.empty:
        return pd.DataFrame(columns=by + ["n_instances"])
    return (skipped.groupby(by, dropna=False, sort=True)["instance"].nunique()
            .rename("n_instances").reset_index())
