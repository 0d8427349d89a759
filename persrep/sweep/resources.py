"""A sweep's memory plan, before compute: what its data units and its trials reserve.

A sweep runs two kinds of heavy work. Its **data phase** runs the generator-prep and synthesis
units of every data option (persrep.sweep.data); each unit reserves the memory its stage's
estimate says (persrep.pipeline.memory), as a job's units do. Each **trial** then trains and
evaluates every instance in one process (persrep.sweep.trial): it reserves the larger of the
personalisation and evaluation estimates, taken over the points of the space whose settings can
change them (each data option with the trial dimensions' corners: a swept backbone, batch size
or resolution; see :func:`_trial_points`). Without these reservations Ray schedules trials by CPU
count alone and the OOM killer picks what runs.

A unit or trial that fits on no node is refused here, in one line, before any compute; the plan
lines are printed. The data phase's reservations are a ``ResourcePlan`` (its units' requests); the trial's figure is
returned for Tune's ``with_resources``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from persrep.pipeline.context import RunContext
from persrep.pipeline.memory import NodeShape, StagePlan, estimate_stage, plan_stages, stage_requests
from persrep.pipeline.resource_plan import ResourcePlan
from persrep.sweep.space import SweepSpace

DATA_STAGES = ("generator_prep", "synthesis")
TRIAL_STAGES = ("personalization", "evaluation")
FULL_PRODUCT = 64  # trial-corner combinations estimated exhaustively; above, per dimension


def _trial_points(space: SweepSpace, options: list[Any], estimate: Callable[[dict[str, Any]], int]
                  ) -> list[dict[str, Any]]:
    """The trial points whose estimate is the largest candidate, for each data option: every
    combination of the trial dimensions' corners when there are few; else the combination of each
    dimension's heaviest corner (memory grows with each of backbone, batch, resolution alone)."""
    keys = list(space.trial_keys)
    corners = [space.dims[k].corners() for k in keys]
    points = []
    for o in options:
        if math.prod(len(c) for c in corners) <= FULL_PRODUCT:
            points += [{**o.values, **dict(zip(keys, combo))} for combo in itertools.product(*corners)]
            continue
        first = {k: c[0] for k, c in zip(keys, corners)}
        heaviest = {k: max(c, key=lambda v, k=k: estimate({**o.values, **first, k: v}))
                    for k, c in zip(keys, corners)}
        points.append({**o.values, **heaviest})
    return points


def _largest(plans: Iterable[StagePlan]) -> StagePlan | None:
    return max(plans, key=lambda p: p.estimate.bytes, default=None)


@dataclass(frozen=True)
class SweepResources:
    """A sweep's plan: what each data-phase unit reserves, and the bytes a trial reserves."""

    data: ResourcePlan
    trial_memory: int = 0


def plan_sweep_resources(ctx: RunContext, space: SweepSpace, options: list[Any], n_trials: int,
                         nodes: list[NodeShape], say: Callable[[str], None]) -> SweepResources:
    """Plan the data phase and the trials (the context is not changed).

    Raises :class:`persrep.pipeline.memory.InsufficientResourcesError` (one line, the fix) when a
    unit or a trial fits on no node."""
    has_gpus = any(n.gpus > 0 for n in nodes)
    counts = {"generator_prep": len({k for o in options for k in o.generator_keys}),
              "synthesis": len({k for o in options for k in o.synthesis_keys.values()})}
    data_plans: dict[str, list[StagePlan]] = {s: [] for s in DATA_STAGES}
    for o in options:
        s = space.settings_for(o.values)
        on_gpu = has_gpus and s.resources.gpus_per_trial > 0
        for p in plan_stages(s, counts, nodes, stage_requests(s, has_gpus), on_gpu):
            data_plans[p.stage].append(p)
    memory: dict[str, int] = {}
    for stage, plans in data_plans.items():
        p = _largest(plans)
        if p is not None:
            memory[stage] = p.estimate.bytes
            say(p.line())

    def trial_estimate(values: dict[str, Any]) -> int:
        s = space.settings_for(values)
        return max(estimate_stage(s, t, has_gpus and s.resources.tune_trial_gpus > 0).bytes for t in TRIAL_STAGES)

    trial_plans: list[StagePlan] = []
    for values in _trial_points(space, options, trial_estimate):
        s = space.settings_for(values)
        on_gpu = has_gpus and s.resources.tune_trial_gpus > 0
        trial_plans += plan_stages(s, {t: n_trials for t in TRIAL_STAGES}, nodes,
                                   stage_requests(s, has_gpus), on_gpu)
    trial = _largest(trial_plans)
    data = ResourcePlan.unplanned(ctx.settings).with_memory(memory)
    if trial is None:
        return SweepResources(data, 0)
    gpu = f", {trial.gpus:g} GPU" if trial.gpus else ""
    say(f"plan sweep trials: {n_trials} trial(s), each {trial.cpus:g} CPU{gpu} and "
        f"{trial.estimate.describe()} ({trial.stage} is its largest step); up to {trial.per_node} at once "
        "on the largest node")
    return SweepResources(data, trial.estimate.bytes)
