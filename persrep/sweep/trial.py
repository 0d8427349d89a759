"""One sweep trial: personalise + evaluate every instance for one point of the space (no Ray).

For the trial's settings (base + the data option's values + the trial keys' values) the
personalisation units are planned as the pipeline plans them, over the data generated before
the trials (:mod:`persrep.sweep.data`). Instances run in a fixed order that alternates
categories; after each one the library's unit functions have published its adapter and its
evaluation (both keyed: a retried or repeated trial skips what exists), and ``report`` receives
the running objective, so an early-stopping scheduler (ASHA over ``instances_done``) can stop a
poor trial after a few instances.

The objective is the mean over instances of the chosen ``task.metric`` of the personalised
backbone (scene ``all``); instances where the metric is undefined (nan) are left out of the mean
and counted in ``instances_nan``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from persrep.evaluation.records import ALL_SCENES
from persrep.pipeline.context import RunContext
from persrep.pipeline.stages.evaluation import adapter_eval_unit, read_rows, run_evaluation_unit
from persrep.pipeline.stages.personalization import plan_personalize_units, run_personalize_unit
from persrep.pipeline.units import ADAPTERS, EVALUATIONS
from persrep.storage import StorageError
from persrep.sweep.data import DataOption, option_context
from persrep.sweep.space import SweepSpace

Report = Callable[[dict[str, Any]], None]
OBJECTIVE = "objective"


class SweepDataError(RuntimeError):
    """A trial's data was not generated (its data phase failed)."""


def instance_order(instances: dict[str, str]) -> list[str]:
    """Instances alternating categories (a0, b0, a1, b1, ...): early rungs see every category."""
    by_cat: dict[str, list[str]] = {}
    for name in sorted(instances):
        by_cat.setdefault(instances[name], []).append(name)
    cats = sorted(by_cat)
    out = []
    for i in range(max((len(v) for v in by_cat.values()), default=0)):
        out += [by_cat[c][i] for c in cats if i < len(by_cat[c])]
    return out


def metric_value(rows: list[dict[str, Any]], task: str, metric: str) -> float:
    """The personalised value of ``task.metric`` on scene ``all`` in one adapter's result rows."""
    vals = [r["value"] for r in rows if r["task"] == task and r["metric"] == metric
            and r["scene"] == ALL_SCENES and r["status"] == "ok" and r.get("model") == "personalised"]
    if len(vals) != 1:
        skipped = [r.get("reason") for r in rows if r["task"] == task and r["status"] == "skipped"]
        if skipped:
            raise SweepDataError(f"metric {task}.{metric}: the task was skipped ({skipped[0]}): "
                                 "choose another metric")
        raise SweepDataError(f"metric {task}.{metric}: {len(vals)} values in the evaluation rows, expected 1")
    return float(vals[0])


def _idempotent(fn: Callable[..., dict[str, Any]], ctx: RunContext, unit: Any, stage: str, key: str) -> None:
    """Run a unit function; a concurrent trial that published the same unit first is fine."""
    try:
        fn(ctx, unit)
    except StorageError:
        if not ctx.storage.is_finished(stage, key):
            raise


def run_trial(ctx: RunContext, space: SweepSpace, option: DataOption, trial_values: dict[str, Any],
              report: Report | None = None) -> dict[str, Any]:
    """Personalise and evaluate every instance; ``report`` gets the running objective after each.

    Returns the final report (also passed to ``report``): ``objective``, ``instances_done``,
    ``instances_total``, ``instances_nan``, and as JSON text ``per_instance`` (instance ->
    value), ``eval_keys`` and ``adapter_keys`` (instance -> unit key) for the results table.
    """
    tctx = option_context(ctx, space, {**option.values, **trial_values})
    units = {u.instance: u for u in plan_personalize_units(tctx, option.synthesis_keys)}
    order = instance_order(ctx.instances)
    missing = [n for n in order if n not in units]
    if missing:
        raise SweepDataError(f"data configuration {option.label}: no training data for {len(missing)} "
                             f"instance(s) ({', '.join(missing[:3])}): its generation failed; re-run "
                             "the sweep to generate it")
    per: dict[str, float] = {}
    eval_keys: dict[str, str] = {}
    adapter_keys: dict[str, str] = {}
    result: dict[str, Any] = {}
    for k, name in enumerate(order, 1):
        u = units[name]
        _idempotent(run_personalize_unit, tctx, u, ADAPTERS, u.key)
        ev = adapter_eval_unit(tctx, u)
        _idempotent(run_evaluation_unit, tctx, ev, EVALUATIONS, ev.key)
        per[name] = metric_value(read_rows(tctx.storage, ev.key), space.task, space.metric_name)
        eval_keys[name], adapter_keys[name] = ev.key, u.key
        finite = [v for v in per.values() if math.isfinite(v)]
        result = {OBJECTIVE: sum(finite) / len(finite) if finite else float("nan"),
                  "instances_done": k, "instances_total": len(order),
                  "instances_nan": len(per) - len(finite), "instance_value": per[name],
                  "per_instance": json.dumps(per), "eval_keys": json.dumps(eval_keys),
                  "adapter_keys": json.dumps(adapter_keys)}
        if report is not None:
            report(result)
    return result
