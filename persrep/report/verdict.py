"""The report's first screen in words: what personalisation changed, per instance, and its cost.

- :func:`instance_table`: one row per personalised model and instance (backbone x data
  configuration x instance): the headline metric per task, pretrained vs personalised and the
  difference, sorted by gain (the mean difference over the tasks), best first; instances of the
  run with a pretrained result but no personalised one follow (they failed).
- :func:`verdicts`: per personalised model, per task: on how many instances both models were
  measured, how many improved (personalised > pretrained, as the terminal's summary counts),
  how many got worse, and the means.
- :func:`run_cost`: wall seconds per instance from ``summary.json``'s ``costs`` (each stage's
  wall seconds; the stages grouped as making the training data, training, evaluating).
- :func:`title_words`: the data set and the run in words (no run id alone, no machine path).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import pandas as pd

from persrep.report.tables import METRIC_NAME, _headline_rows, _tasks

# stages of a run grouped by what a person would call them
STAGE_GROUPS = {"auto_masks": "making training data", "captions": "making training data",
                "base_images": "making training data", "generator_prep": "making training data",
                "synthesis": "making training data", "personalization": "training",
                "evaluation": "evaluating"}
GENERATOR_WORDS = {"real_only": "the real photos only", "cut_paste": "cut-and-paste composites",
                   "dreambooth": "DreamBooth images", "dreambooth_lora": "DreamBooth-LoRA images"}
OPTIONAL_COLUMNS = ("model_used", "model_reason")  # the safety net's columns, shown when present


def metric_name(task: str) -> str:
    from persrep.report.tables import HEADLINE

    return METRIC_NAME.get(HEADLINE.get(task, ""), HEADLINE.get(task, ""))


# ---------------------------------------------------------------------------------------------
# per instance
def _optional(frame: pd.DataFrame) -> list[str]:
    return [c for c in OPTIONAL_COLUMNS if c in frame
            and (frame[c].notna() & (frame[c].astype(str).str.strip() != "")).any()]


def instance_table(frame: pd.DataFrame, mask_confidence: dict[str, float] | None = None,
                   mask_boxes: dict[str, int] | None = None) -> pd.DataFrame:
    """Rows (backbone, data_config, instance) with ``<task>_pretrained``, ``<task>_personalised``,
    ``<task>_delta`` (x1, not x100), ``gain`` (mean delta over the tasks), ``positives_used``,
    ``n_positives`` (when the results carry it), the optional columns and ``mask_confidence``
    (when given); sorted by gain, best first, instances without a personalised result last."""
    rows = _headline_rows(frame)
    if rows.empty:
        return pd.DataFrame()
    tasks = _tasks(rows)
    extra = _optional(frame)
    pre = rows[rows["model"] == "pretrained"].groupby(["backbone", "instance", "task"])["value"].mean()
    per = rows[rows["model"] != "pretrained"]
    cat = rows.groupby("instance")["category"].first() if "category" in rows else pd.Series(dtype=str)
    out: list[dict[str, Any]] = []
    for (bb, dc, inst), grp in per.groupby(["backbone", "data_config", "instance"], sort=True):
        first = grp.iloc[0]
        rec: dict[str, Any] = {"instance": inst, "category": cat.get(inst, "-"), "backbone": bb,
                               "data_config": dc, "positives_used": first.get("positives_used", "-"),
                               "status": "ok"}
        if "n_positives" in grp:
            rec["n_positives"] = first["n_positives"]
        for c in extra:
            vals = grp[c].dropna().astype(str)
            rec[c] = vals.iloc[0] if len(vals) else ""
        deltas = []
        for t in tasks:
            mine = grp[grp["task"] == t]["value"]
            p = float(mine.mean()) if len(mine) else math.nan
            b = float(pre.get((bb, inst, t), math.nan))
            rec[f"{t}_pretrained"], rec[f"{t}_personalised"] = b, p
            rec[f"{t}_delta"] = p - b
            if math.isfinite(p - b):
                deltas.append(p - b)
        rec["gain"] = float(np.mean(deltas)) if deltas else math.nan
        out.append(rec)
    # instances evaluated pretrained but never personalised (their units failed)
    done = {(r["backbone"], r["instance"]) for r in out}
    pre_rows = rows[rows["model"] == "pretrained"]
    for (bb, inst), grp in pre_rows.groupby(["backbone", "instance"], sort=True):
        if (bb, inst) in done:
            continue
        rec = {"instance": inst, "category": cat.get(inst, "-"), "backbone": bb, "data_config": "-",
               "positives_used": "-", "status": "no personalised result", "gain": math.nan}
        for t in tasks:
            b = float(pre.get((bb, inst, t), math.nan))
            rec[f"{t}_pretrained"], rec[f"{t}_personalised"], rec[f"{t}_delta"] = b, math.nan, math.nan
        out.append(rec)
    table = pd.DataFrame(out)
    if mask_confidence:
        table["mask_confidence"] = table["instance"].map(lambda i: mask_confidence.get(i, math.nan))
        # train photos whose mask is the labelled box fallback (nothing found): 0 when none
        table["mask_boxes"] = table["instance"].map(lambda i: int((mask_boxes or {}).get(i, 0)))
    table["_failed"] = table["status"] != "ok"
    table["_key"] = -table["gain"].fillna(-np.inf)
    return (table.sort_values(["_failed", "_key", "instance", "backbone", "data_config"], kind="stable")
            .drop(columns=["_failed", "_key"]).reset_index(drop=True))


# ---------------------------------------------------------------------------------------------
# the verdict
@dataclass
class TaskVerdict:
    task: str
    n: int             # instances measured with both models
    improved: int      # personalised > pretrained
    worse: int         # personalised < pretrained
    pretrained: float  # means over those n instances (x1)
    personalised: float
    delta: float       # mean of the per-instance differences (x1)

    @property
    def metric(self) -> str:
        return metric_name(self.task)


@dataclass
class Verdict:
    backbone: str
    data_config: str
    tasks: list[TaskVerdict] = field(default_factory=list)

    @property
    def mean_delta(self) -> float:
        d = [t.delta for t in self.tasks if math.isfinite(t.delta)]
        return float(np.mean(d)) if d else math.nan


def verdicts(frame: pd.DataFrame) -> list[Verdict]:
    """One :class:`Verdict` per personalised model (backbone, data configuration), best first."""
    table = instance_table(frame)
    if table.empty:
        return []
    ok = table[table["status"] == "ok"]
    tasks = [c[:-len("_delta")] for c in table.columns if c.endswith("_delta")]
    out = []
    for (bb, dc), grp in ok.groupby(["backbone", "data_config"], sort=True):
        v = Verdict(bb, dc)
        for t in tasks:
            both = grp[np.isfinite(grp[f"{t}_delta"].astype(float))]
            if both.empty:
                continue
            pre, per = both[f"{t}_pretrained"].astype(float), both[f"{t}_personalised"].astype(float)
            v.tasks.append(TaskVerdict(t, len(both), int((per > pre).sum()), int((per < pre).sum()),
                                       float(pre.mean()), float(per.mean()), float((per - pre).mean())))
        if v.tasks:
            out.append(v)
    return sorted(out, key=lambda v: (-v.mean_delta if math.isfinite(v.mean_delta) else math.inf,
                                      v.backbone, v.data_config))


def _points(x: float) -> str:
    r = round(100 * x, 1)
    return "±0.0" if r == 0 else f"{r:+.1f}"


def task_sentence(t: TaskVerdict) -> str:
    """``retrieval: 3 of 4 instances improved, 1 got worse; NDCG 61.2 -> 65.3 (+4.1 points)``."""
    worse = f", {t.worse} got worse" if t.worse else ""
    return (f"{t.task}: {t.improved} of {t.n} instance{'s' if t.n != 1 else ''} improved{worse}; "
            f"{t.metric} {100 * t.pretrained:.1f} → {100 * t.personalised:.1f} "
            f"({_points(t.delta)} points on average)")


def lead_sentence(v: Verdict, cost: RunCost | None = None) -> str:
    """The verdict in one line, every task of the model: ``Personalisation improved 3 of 4
    instances on classification (1 worse; AP +1.0 points on average) and 1 of 4 on retrieval
    (NDCG -0.5), at 42 s per instance.``"""
    parts = []
    for i, t in enumerate(v.tasks):
        of = f"{t.improved} of {t.n}" + (f" instance{'s' if t.n != 1 else ''}" if i == 0 else "")
        avg = " points on average" if i == 0 else ""
        worse = f"{t.worse} worse; " if t.worse else ""
        parts.append(f"{of} on {t.task} ({worse}{t.metric} {_points(t.delta)}{avg})")
    text = "Personalisation improved " + (", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0])
    if cost is not None and math.isfinite(cost.per_instance):
        text += f", at {_duration(cost.per_instance)} per instance"
    return text + "."


def config_words(data_config: str, auto_masks: bool = False) -> str:
    """``cut_paste`` -> ``cut-and-paste composites``; ``dreambooth/cfg4/template`` ->
    ``DreamBooth images (CFG 4, template captions)``."""
    m = re.match(r"^(?P<gen>[^/]+)/cfg(?P<cfg>[^/]+)/(?P<cap>.+)$", str(data_config))
    gen = m["gen"] if m else str(data_config)
    words = GENERATOR_WORDS.get(gen, gen.replace("_", " "))
    if m:
        words += f" (CFG {m['cfg']}, {m['cap'].replace('_', ' ')} captions)"
    if auto_masks and gen != "real_only":
        words += " from automatic masks"
    return words


# ---------------------------------------------------------------------------------------------
# cost
@dataclass
class RunCost:
    seconds: float                 # wall seconds of the stages, summed
    instances: int
    parts: dict[str, float]        # group -> wall seconds
    reused: int = 0                # units published earlier (cost nothing in this run)

    @property
    def per_instance(self) -> float:
        return self.seconds / self.instances if self.instances else math.nan


def run_cost(summary: dict[str, Any], instances: int | None = None) -> RunCost | None:
    """Wall seconds from ``summary['costs']`` (each stage's ``stage_seconds``; ``timings`` where
    a stage has none) per instance of the run (``summary['instances']``, else ``instances``)."""
    costs = summary.get("costs") or {}
    if not costs:
        return None
    timings = summary.get("timings") or {}
    parts: dict[str, float] = {}
    reused = 0
    for stage, c in costs.items():
        s = c.get("stage_seconds")
        if s is None:
            s = timings.get(stage)
        if s is not None and math.isfinite(float(s)):
            group = STAGE_GROUPS.get(stage, "other")
            parts[group] = parts.get(group, 0.0) + float(s)
        reused += sum(int(t.get("skipped", 0)) for t in (c.get("unit_types") or {}).values())
    n = int(summary.get("instances") or instances or 0)
    if not parts or n <= 0:
        return None
    return RunCost(sum(parts.values()), n, parts, reused)


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def cost_sentence(c: RunCost) -> str:
    order = ["making training data", "training", "evaluating", "other"]
    parts = ", ".join(f"{g} {_duration(c.parts[g] / c.instances)}" for g in order if g in c.parts)
    text = (f"Cost: {_duration(c.per_instance)} per instance of wall time "
            f"({_duration(c.seconds)} for {c.instances} instances: {parts} per instance)")
    if c.reused:
        text += (f"; {c.reused} unit{'s were' if c.reused != 1 else ' was'} reused from earlier runs "
                 "and cost nothing here")
    return text + "."


# ---------------------------------------------------------------------------------------------
# title
def dataset_words(data: Any) -> str:
    """The data set's folder name in words (``grocery_produce`` -> ``grocery produce``); a toy
    world generated in the storage reads ``toy world``."""
    if not data:
        return "results"
    name = PurePosixPath(str(data).rstrip("/").replace("\\", "/")).name or str(data)
    if re.fullmatch(r"toy(-[0-9a-f]+)?", name):
        return "toy world"
    return re.sub(r"[_\-]+", " ", name).strip() or name


def title_words(summary: dict[str, Any], frame: pd.DataFrame) -> str:
    """``grocery produce: 39 instances personalised with cut-and-paste composites from automatic
    masks (run baseline)``."""
    data = dataset_words(summary.get("data"))
    n = int(summary.get("instances") or frame["instance"].nunique())
    configs = sorted(set(frame.loc[frame["model"] != "pretrained", "data_config"].dropna()) - {"-"})
    auto = bool((summary.get("stages") or {}).get("auto_masks"))
    if len(configs) == 1:
        how = f" personalised with {config_words(configs[0], auto)}"
    elif configs:
        how = f" personalised with {len(configs)} data configurations"
    else:
        how = ""
    run = summary.get("run_id")
    return f"{data}: {n} instance{'s' if n != 1 else ''}{how}" + (f" (run {run})" if run else "")


__all__ = ["RunCost", "TaskVerdict", "Verdict", "config_words", "cost_sentence", "dataset_words",
           "instance_table", "lead_sentence", "run_cost", "task_sentence", "title_words", "verdicts"]
