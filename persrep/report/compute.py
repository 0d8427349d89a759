"""Compute vs quality across data configurations: seconds spent generating and training per
instance against the gain over the pretrained backbone (the trade-off the paper analyses).

Seconds are the units' own recorded ``seconds`` (``MANIFEST.json`` meta, written when the unit
was computed, so a re-run that skipped a unit still counts what it once cost): generator prep of
the configuration's generator for that instance (shared by every CFG / caption configuration of
that generator, and counted in full for each), the instance's synthesis unit of that
configuration, and its personalisation unit. Real-only has no generation cost. Gain = mean over
instances of (personalised - pretrained) of the task's headline metric, scene ``all``.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from persrep.report.tables import HEADLINE, METRIC_NAME, _headline_rows, _tasks

_CFG_LABEL = re.compile(r"^(?P<gen>[^/]+)/cfg(?P<cfg>[^/]+)/(?P<cap>.+)$")


def _config_key(label: str) -> str:
    from persrep.generation.plan import DataConfig

    m = _CFG_LABEL.match(label)
    cfg = DataConfig(m["gen"], float(m["cfg"]), m["cap"]) if m else DataConfig(label, None, "none")
    return cfg.key


def compute_frame(units: list[dict[str, Any]], storage: Any, frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (backbone, data config): mean seconds per instance (generate, train) and the
    mean gain x100 per task (``gain_<task>``)."""
    def seconds(stage: str, key: str) -> float:
        try:
            return float(storage.manifest(stage, key).meta.get("seconds", np.nan))
        except Exception:  # noqa: BLE001 - a unit deleted since: unknown cost
            return float("nan")

    ok = [u for u in units if u.get("key") and u["status"] != "failed"]
    gen = {u["label"]: seconds("generators", u["key"]) for u in ok if u["stage"] == "generator_prep"}
    syn = {u["label"]: seconds("synthesis", u["key"]) for u in ok
           if u["stage"] == "synthesis" and u["label"].startswith("pos:")}
    per: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for u in ok:
        if u["stage"] != "personalization" or u["label"].count(":") < 2:
            continue
        config, backbone, inst = u["label"].rsplit(":", 2)
        generator = _CFG_LABEL.match(config)["gen"] if _CFG_LABEL.match(config) else config
        g = 0.0 if _real_positives(generator) else syn.get(f"pos:{_config_key(config)}:{inst}", np.nan)
        g += gen.get(f"{generator}:{inst}", 0.0)
        per[(backbone, config)].append((g, seconds("adapters", u["key"])))
    if not per:
        return pd.DataFrame()
    head = _headline_rows(frame)
    tasks = _tasks(head) if len(head) else []
    pre = head[head["model"] == "pretrained"].groupby(["backbone", "instance", "task"])["value"].mean()
    rows = []
    for (backbone, config), secs in sorted(per.items()):
        arr = np.asarray(secs, dtype=float)
        row = {"backbone": backbone, "data_config": config, "instances": len(secs),
               "seconds_generate": float(np.nanmean(arr[:, 0])) if np.isfinite(arr[:, 0]).any() else np.nan,
               "seconds_train": float(np.nanmean(arr[:, 1])) if np.isfinite(arr[:, 1]).any() else np.nan}
        mine = head[(head["model"] != "pretrained") & (head["data_config"] == config)
                    & (head["backbone"] == backbone)]
        for t in tasks:
            sub = mine[mine["task"] == t].groupby("instance")["value"].mean()
            gains = [v - pre.get((backbone, i, t), np.nan) for i, v in sub.items()]
            row[f"gain_{t}"] = 100 * float(np.nanmean(gains)) if np.isfinite(gains).any() else np.nan
        rows.append(row)
    out = pd.DataFrame(rows)
    out["seconds_total"] = out["seconds_generate"].fillna(0) + out["seconds_train"].fillna(0)
    return out


def plot_compute_quality(table: pd.DataFrame, path: Path) -> Path | None:
    """Gain (x100) vs seconds per instance, one marker per data configuration and task."""
    if table.empty:
        return None
    from persrep.report.plots import PALETTE, _figure

    tasks = [c[len("gain_"):] for c in table.columns if c.startswith("gain_")]
    fig = _figure(7.2, 3.8)
    ax = fig.subplots()
    markers = ["o", "s", "^", "D", "v", "P"]
    for j, t in enumerate(tasks):
        ax.scatter(table["seconds_total"], table[f"gain_{t}"], s=46, color=PALETTE[j % len(PALETTE)],
                   marker=markers[j % len(markers)],
                   label=f"{t} ({METRIC_NAME.get(HEADLINE.get(t, ''), '')})", zorder=3)
    for r in table.itertuples():
        best = max((getattr(r, f"gain_{t}") for t in tasks
                    if np.isfinite(getattr(r, f"gain_{t}"))), default=0.0)
        ax.annotate(str(r.data_config), (r.seconds_total, best), textcoords="offset points",
                    xytext=(4, 6), fontsize=8)
    ax.axhline(0, color="#9aa0a6", linewidth=0.8)
    ax.set_xlabel("seconds per instance (generator prep + synthesis + personalisation)")
    ax.set_ylabel("gain over pretrained (x100)")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.savefig(path)
    return path


def _real_positives(generator: str) -> bool:
    """Whether a type's positives are the real photos (no synthesis cost); a type no longer
    registered counts as synthetic (its cost is then read, or unknown)."""
    from persrep.generation.base import generator_caps

    try:
        return generator_caps(generator).positives_are_real
    except ValueError:
        return False
