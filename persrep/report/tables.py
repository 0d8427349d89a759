"""Loading a run's tidy results and the paper-style tables built from them (values x100 in
the rendering, mean +- sample std over instances)."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from persrep.evaluation.aggregate import HEADLINE

TASKS = ["classification", "retrieval", "detection", "segmentation"]
METRIC_NAME = {"ap": "AP", "ndcg": "NDCG", "map": "mAP"}
SCENES = ["in_distribution", "pose", "distractors", "pose_and_distractors"]
DEFAULTS = {"backbone": "-", "model": "personalised", "data_config": "-", "generator": "-",
            "cfg": float("nan"), "caption_source": "-", "global_feature": "-",
            "negatives_source": "-", "positives_used": "-"}

# ---------------------------------------------------------------------------------------------
# loading
@dataclass
class RunData:
    frame: pd.DataFrame
    summary: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] | None = None
    source: str = "results"

    @property
    def fallbacks(self) -> pd.DataFrame:
        """(data_config, backbone, instance) of adapters trained on the real photos instead of
        their synthetic positives (synthesis.filter.on_empty=real_only)."""
        if "positives_used" not in self.frame:
            return pd.DataFrame(columns=["data_config", "backbone", "instance"])
        f = self.frame[self.frame["positives_used"] == "real_only_fallback"]
        return f[["data_config", "backbone", "instance"]].drop_duplicates().reset_index(drop=True)

    @property
    def leakage(self) -> bool:
        return bool(self.summary.get("leakage_warning")) or (
            "negatives_source" in self.frame and (self.frame["negatives_source"] == "in_pool").any())


def _read(run_dir: str, name: str) -> bytes | None:
    if run_dir.startswith("s3://"):
        from persrep.storage import Storage, StorageError

        try:
            return Storage(run_dir).read_bytes(name)
        except StorageError:
            if name == "results.parquet":
                raise
            return None
    p = Path(run_dir) / name
    return p.read_bytes() if p.is_file() else None


def run_root(run_source: str) -> str:
    """``<root>/runs/<run_id>`` -> ``<root>`` (local path or s3:// URI)."""
    parts = str(run_source).rstrip("/").rsplit("/", 2)
    if len(parts) < 3 or parts[1] != "runs":
        raise ValueError(f"{run_source} is not a run directory (<storage root>/runs/<run_id>)")
    return parts[0]


def load_run(run_dir_or_results: Any) -> RunData:
    """A run directory (local or s3://), a results parquet path, a DataFrame or a RunData."""
    if isinstance(run_dir_or_results, RunData):
        return run_dir_or_results
    if isinstance(run_dir_or_results, pd.DataFrame):
        return RunData(_normalise(run_dir_or_results))
    src = str(run_dir_or_results).rstrip("/")
    if src.endswith(".parquet"):
        frame = pd.read_parquet(src)
        src = src.rsplit("/", 1)[0] if "/" in src else "."
    else:
        data = _read(src, "results.parquet")
        if data is None:
            raise FileNotFoundError(f"{src}: no results.parquet (give a finished run directory, "
                                    "e.g. <storage root>/runs/<run id>)")
        frame = pd.read_parquet(io.BytesIO(data))
    summary = json.loads(_read(src, "summary.json") or b"{}")
    settings = None
    raw = _read(src, "settings.yaml")
    if raw:
        import yaml

        settings = yaml.safe_load(raw)
    elif isinstance(summary.get("settings"), dict):
        settings = summary["settings"]
    return RunData(_normalise(frame), summary, settings, src)


def _normalise(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    for col, default in DEFAULTS.items():
        if col not in frame:
            frame[col] = default
    frame["value"] = frame["value"].astype(float)
    frame["cfg"] = pd.to_numeric(frame["cfg"], errors="coerce")
    return frame


# ---------------------------------------------------------------------------------------------
# tables
def format_cell(mean: float, std: float = float("nan")) -> str:
    """``42.9 ± 3.1`` (x100); the std is left out when undefined (a single instance)."""
    if mean is None or not math.isfinite(mean):
        return "–"
    if std is None or not math.isfinite(std):
        return f"{100 * mean:.1f}"
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def _headline_rows(frame: pd.DataFrame, scene: str | None = "all") -> pd.DataFrame:
    ok = frame[frame["status"] == "ok"]
    if scene is not None:
        ok = ok[ok["scene"] == scene]
    return ok[[HEADLINE.get(t) == m for t, m in zip(ok["task"], ok["metric"])]]


def _variant_columns(frame: pd.DataFrame) -> list[str]:
    per = frame[frame["model"] != "pretrained"]
    varying = [c for c in ("global_feature", "negatives_source")
               if c in per and per[c].nunique(dropna=False) > 1]
    # positives: only worth a label when some adapter did not train on what its configuration names
    if "positives_used" in per and (per["positives_used"] == "real_only_fallback").any():
        varying.append("positives_used")
    return varying


def _label_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Add ``label``: 'pretrained' or the personalised data configuration (+ varying keys)."""
    frame = frame.copy()
    extra = _variant_columns(frame)

    def label(row: pd.Series) -> str:
        if row["model"] == "pretrained":
            return "pretrained"
        parts = [str(row["data_config"])] + [f"{c.split('_')[0]}={row[c]}" for c in extra]
        return "personalised · " + " · ".join(parts)
    frame["label"] = frame.apply(label, axis=1) if len(frame) else pd.Series(dtype=str)
    return frame


def _tasks(frame: pd.DataFrame) -> list[str]:
    present = set(frame["task"])
    return [t for t in TASKS if t in present] + sorted(present - set(TASKS))


def _stats(frame: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    g = frame.groupby(by, dropna=False, sort=True)["value"]
    return g.agg(mean="mean", std="std", n="count").reset_index()


def _order_labels(labels: Sequence[str]) -> list[str]:
    return sorted(set(labels), key=lambda s: (s != "pretrained", s))


def backbone_task_table(frame: pd.DataFrame) -> pd.DataFrame:
    """(a) rows (backbone, label), columns per task: mean/std/n/delta of the headline metric."""
    rows = _label_frame(_headline_rows(frame))
    tasks = _tasks(rows) if len(rows) else []
    if rows.empty:
        return pd.DataFrame(columns=["backbone", "label"])
    st = _stats(rows, ["backbone", "label", "task"])
    out = []
    for bb in sorted(st["backbone"].unique()):
        sub = st[st["backbone"] == bb]
        pre = {r.task: r.mean for r in sub[sub["label"] == "pretrained"].itertuples()}
        for lab in _order_labels(sub["label"]):
            rec: dict[str, Any] = {"backbone": bb, "label": lab}
            for t in tasks:
                r = sub[(sub["label"] == lab) & (sub["task"] == t)]
                m = float(r["mean"].iloc[0]) if len(r) else float("nan")
                rec[f"{t}_mean"] = m
                rec[f"{t}_std"] = float(r["std"].iloc[0]) if len(r) else float("nan")
                rec[f"{t}_n"] = int(r["n"].iloc[0]) if len(r) else 0
                rec[f"{t}_delta"] = (_paired_delta(rows, bb, lab, t) if lab != "pretrained" and t in pre
                                     else float("nan"))
            out.append(rec)
    return pd.DataFrame(out)


def _paired_delta(rows: pd.DataFrame, backbone: str, label: str, task: str) -> float:
    """Mean over instances of (personalised - pretrained), on the instances both were measured on
    (an instance whose adapter failed has a pretrained value only and is left out)."""
    sub = rows[(rows["backbone"] == backbone) & (rows["task"] == task)]
    per = sub[sub["label"] == label].groupby("instance")["value"].mean()
    pre = sub[sub["label"] == "pretrained"].groupby("instance")["value"].mean()
    both = per.index.intersection(pre.index)
    return float((per[both] - pre[both]).mean()) if len(both) else float("nan")


def generation_table(frame: pd.DataFrame) -> pd.DataFrame:
    """(b) rows (backbone, generator, cfg, caption source, data config), headline per task."""
    rows = _headline_rows(frame)
    if rows.empty:
        return pd.DataFrame()
    keys = ["backbone", "generator", "cfg", "caption_source", "data_config"] + _variant_columns(rows)
    rows = rows.assign(generator=np.where(rows["model"] == "pretrained", "pretrained", rows["generator"]))
    out = []
    for key, grp in rows.groupby(keys, dropna=False, sort=False):
        rec: dict[str, Any] = dict(zip(keys, key))
        for task, g in grp.groupby("task"):
            v = g["value"]
            rec[f"{task}_mean"], rec[f"{task}_std"], rec[f"{task}_n"] = v.mean(), v.std(), v.count()
        out.append(rec)
    wide = pd.DataFrame(out)
    wide["_pre"] = wide["generator"] != "pretrained"
    return wide.sort_values(["backbone", "_pre", "generator", "cfg", "caption_source", "data_config"],
                            na_position="first").drop(columns="_pre").reset_index(drop=True)


def scene_table(frame: pd.DataFrame, task: str = "classification") -> pd.DataFrame:
    """(c) classification AP per test scene: rows (backbone, label), columns per scene."""
    rows = _headline_rows(frame, scene=None)
    rows = _label_frame(rows[rows["task"] == task])
    if rows.empty or set(rows["scene"]) <= {"all"}:
        return pd.DataFrame()
    st = _stats(rows, ["backbone", "label", "scene"])
    out = []
    for (bb, lab), sub in st.groupby(["backbone", "label"], sort=True):
        rec: dict[str, Any] = {"backbone": bb, "label": lab}
        for r in sub.itertuples():
            rec[f"{r.scene}_mean"], rec[f"{r.scene}_std"], rec[f"{r.scene}_n"] = r.mean, r.std, r.n
        out.append(rec)
    df = pd.DataFrame(out)
    return df.sort_values(["backbone", "label"], key=lambda s: s.map(
        lambda v: (v != "pretrained", v)) if s.name == "label" else s).reset_index(drop=True)


def _scenes(frame: pd.DataFrame) -> list[str]:
    present = {c[:-5] for c in frame.columns if c.endswith("_mean")}
    return [s for s in SCENES if s in present] + sorted(present - set(SCENES) - {"all"}) + (
        ["all"] if "all" in present else [])


def _all_metrics(frame: pd.DataFrame) -> pd.DataFrame:
    ok = _label_frame(frame[(frame["status"] == "ok") & (frame["scene"] == "all")])
    if ok.empty:
        return pd.DataFrame()
    st = _stats(ok, ["backbone", "label", "task", "metric"])
    st["task"] = pd.Categorical(st["task"], [t for t in TASKS if t in set(st["task"])] +
                                sorted(set(st["task"]) - set(TASKS)))
    return st.sort_values(["backbone", "task", "metric", "label"]).reset_index(drop=True)


def _skipped(frame: pd.DataFrame) -> pd.DataFrame:
    sk = _label_frame(frame[frame["status"] == "skipped"])
    if sk.empty:
        return pd.DataFrame()
    out = (sk.groupby(["backbone", "label", "task", "reason"], dropna=False, sort=True)["instance"]
           .nunique().rename("instances").reset_index())
    out["_pre"] = out["label"] != "pretrained"
    return out.sort_values(["backbone", "task", "_pre", "label"]).drop(columns="_pre")
