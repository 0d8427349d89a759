"""A sweep's outcome: the table of trials (params -> objective), the best trial, result rows.

Written to ``<root>/sweeps/<name>/`` beside Tune's experiment files: ``trials.csv`` (one row per
trial), ``results.parquet`` (every trial's per-instance evaluation rows, with the trial's
params), ``sweep.json`` (space, data phase, best trial, table). No Ray here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from persrep.storage import Storage
from persrep.sweep.data import DataOption, DataReport
from persrep.sweep.space import SweepSpace
from persrep.sweep.trial import OBJECTIVE


@dataclass
class TrialRecord:
    """What the driver knows of one finished trial (from Tune's result grid)."""

    trial: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    error: str | None = None


@dataclass
class SweepResult:
    name: str
    space: SweepSpace
    trials: pd.DataFrame
    best: dict[str, Any] | None
    data: DataReport
    experiment_path: str = ""
    output_uri: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        failed = self.data.failures or (len(self.trials) and (self.trials["status"] == "error").any())
        return 1 if failed or not len(self.trials) else 0


def _status(rec: TrialRecord) -> str:
    if rec.error:
        return "error"
    done, total = rec.metrics.get("instances_done"), rec.metrics.get("instances_total")
    if done is None:
        return "error"
    return "complete" if done == total else "stopped"


def trials_frame(space: SweepSpace, options: list[DataOption], records: list[TrialRecord]) -> pd.DataFrame:
    """One row per trial: trial, data option, each data key, each trial key, objective, status."""
    by_label = {o.label: o for o in options}
    rows = []
    for rec in records:
        opt = by_label.get(rec.config.get("data"))
        row: dict[str, Any] = {"trial": rec.trial, "data": rec.config.get("data")}
        for k in space.data_keys:
            row[k] = opt.column(k) if opt else None
        for k, v in space.trial_values(rec.config).items():
            row[k] = v
        row[space.spec.metric] = rec.metrics.get(OBJECTIVE, float("nan"))
        row["instances"] = rec.metrics.get("instances_done", 0)
        row["of"] = rec.metrics.get("instances_total", 0)
        row["status"] = _status(rec)
        row["error"] = rec.error
        rows.append(row)
    cols = ["trial", "data", *space.data_keys, *space.trial_keys, space.spec.metric, "instances", "of",
            "status", "error"]
    frame = pd.DataFrame(rows, columns=cols)
    return frame.sort_values("trial", kind="stable").reset_index(drop=True) if len(frame) else frame


def best_trial(space: SweepSpace, frame: pd.DataFrame) -> dict[str, Any] | None:
    """The best complete trial (all instances) by the objective; stopped trials only if none is."""
    if frame.empty:
        return None
    m = space.spec.metric
    ok = frame[frame[m].map(lambda v: isinstance(v, (int, float)) and math.isfinite(v))]
    pool = ok[ok["status"] == "complete"]
    pool = pool if len(pool) else ok[ok["status"] == "stopped"]
    if pool.empty:
        return None
    row = pool.sort_values(m, ascending=space.spec.mode == "min", kind="stable").iloc[0]
    params = {k: _plain(row[k]) for k in ["data", *space.data_keys, *space.trial_keys]}
    return {"trial": row["trial"], "objective": float(row[m]), "metric": m, "mode": space.spec.mode,
            "instances": int(row["instances"]), "params": params}


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        return v.item()
    return v


def format_trials(space: SweepSpace, frame: pd.DataFrame, best: dict[str, Any] | None) -> str:
    """The final table (params -> objective), best first line marked with ``*``."""
    if frame.empty:
        return "no trials"
    m = space.spec.metric
    cols = ["data", *space.trial_keys]
    shown = {c: c.rsplit(".", 1)[-1] if c != "data" else c for c in cols}
    width = {c: max(len(shown[c]), *(len(_fmt(v)) for v in frame[c])) for c in cols}
    head = "  " + " ".join(f"{shown[c]:{width[c]}s}" for c in cols) + f" {m:>14s} {'instances':>9s}  status"
    lines = [head, "-" * len(head)]
    order = frame.sort_values(m, ascending=space.spec.mode == "min", na_position="last", kind="stable")
    for _, r in order.iterrows():
        mark = "*" if best and r["trial"] == best["trial"] else " "
        val = r[m]
        val_s = f"{val:14.4f}" if isinstance(val, float) and math.isfinite(val) else f"{'-':>14s}"
        lines.append(f"{mark} " + " ".join(f"{_fmt(r[c]):{width[c]}s}" for c in cols)
                     + f" {val_s} {int(r['instances']):>4d}/{int(r['of']):<4d}  {r['status']}"
                     + (f": {r['error']}" if r["status"] == "error" and r["error"] else ""))
    if best:
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in best["params"].items())
        lines.append(f"best ({space.spec.mode} {m}): {best['objective']:.4f} with {params}")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return str(v)


def results_rows(storage: Storage, space: SweepSpace, frame: pd.DataFrame,
                 records: list[TrialRecord]) -> pd.DataFrame:
    """Every trial's per-instance evaluation rows (read from its published evaluation units)."""
    from persrep.evaluation.aggregate import results_frame
    from persrep.pipeline.stages.evaluation import read_rows

    params = frame.set_index("trial")
    out = []
    for rec in records:
        keys = json.loads(rec.metrics.get("eval_keys") or "{}")
        for instance, key in keys.items():
            for row in read_rows(storage, key):
                row = dict(row)
                row["trial"] = rec.trial
                row["sweep_data"] = rec.config.get("data")
                for k in space.trial_keys:
                    row[k] = _fmt(params.loc[rec.trial, k]) if rec.trial in params.index else None
                out.append(row)
    return results_frame(out)


def write_outputs(storage: Storage, result: SweepResult, records: list[TrialRecord]) -> str:
    """trials.csv, results.parquet and sweep.json under ``sweeps/<name>/``; returns its URI."""
    import pyarrow as pa

    from persrep.generation.shards import table_bytes

    base = f"sweeps/{result.name}"
    storage.write_bytes(f"{base}/trials.csv", result.trials.to_csv(index=False).encode())
    rows = results_rows(storage, result.space, result.trials, records)
    storage.write_bytes(f"{base}/results.parquet",
                        table_bytes(pa.Table.from_pandas(rows, preserve_index=False)))
    doc = {"name": result.name, "space": result.space.path, "metric": result.space.spec.metric,
           "mode": result.space.spec.mode, "search": result.space.spec.search,
           "experiment": result.experiment_path, "best": result.best,
           "data": {"line": result.data.line(), "planned": result.data.planned,
                    "already": result.data.already, "stages": result.data.stages,
                    "failures": result.data.failures, "seconds": result.data.seconds},
           "notes": result.notes,
           "trials": json.loads(result.trials.to_json(orient="records"))}
    storage.write_bytes(f"{base}/sweep.json", json.dumps(doc, indent=1, default=str).encode())
    storage.write_bytes(f"{base}/space.yaml", result.space.text.encode())
    return storage.uri(base)
