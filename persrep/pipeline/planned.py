"""A stage, one shape for all of them: plan its units, compute one unit, report how it went.

Every stage of the pipeline is a list of keyed, idempotent units and a function that computes
one (``persrep/pipeline/stages/<stage>.py``). :class:`PlannedStage` says that once: ``plan`` (the
units, each with a ``key``), ``compute`` (one unit, mapped by the executor unless the executor
declares a stage runner for it), ``label`` (the unit's name in progress lines, the summary and
``units.json``), whose memory reservation a unit takes, and ``report`` (what the stage adds to the
summary and to :class:`StageScope` afterwards). :func:`run_planned` runs one with any executor.

A stage module's ``planned(scope)`` builds its :class:`PlannedStage` for one pass over the stage
list; :class:`StageScope` carries what that pass shares: the run context, the summary, progress,
the resource plan and what the earlier stages made (trained generators, synthesis units,
adapters) for the later stages' planners.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from persrep.pipeline.executor import Executor, Outcome, StageJob
from persrep.pipeline.progress import Progress
from persrep.pipeline.resource_plan import ResourcePlan


@dataclass(frozen=True)
class PlannedStage:
    """One stage: ``plan() -> units``, ``compute(ctx, unit) -> outcome value``, ``label(unit)``."""

    name: str
    plan: Callable[[], Sequence[Any]]
    compute: Callable[[Any, Any], dict[str, Any]]
    label: Callable[[Any], str]
    resources: str | None = None  # whose memory reservation a unit takes (default: ``name``)
    report: Callable[[list[Any], list[Outcome]], None] | None = None  # after the stage
    always: bool = False  # recorded in the summary even with no units to run
    available: Callable[[list[Any]], None] | None = None  # told the planned units in ``skip`` (made earlier)


@dataclass
class StageRun:
    """What :func:`run_planned` did: every planned unit, those it ran and their outcomes."""

    planned: list[Any]
    ran: list[Any]
    outcomes: list[Outcome]

    def failed_keys(self) -> set[str]:
        return {u.key for u, o in zip(self.ran, self.outcomes) if o.status == "failed"}

    def available(self) -> list[Any]:
        """Planned units that exist or were made now: skipped earlier, or ran without failing."""
        ran = {u.key: o for u, o in zip(self.ran, self.outcomes)}
        return [u for u in self.planned if u.key not in ran or ran[u.key].status != "failed"]


@dataclass
class StageScope:
    """One pass over the stage list: the run context, where outcomes are recorded (``summary``: a
    ``persrep.pipeline.results.RunSummary``), progress, the resource plan, the tracker, and what
    each stage made for the planners after it."""

    ctx: Any
    summary: Any
    progress: Progress
    plan: Callable[[], ResourcePlan]
    tracker: Any = None
    ready: dict[tuple[str, str], str] = field(default_factory=dict)  # (generator, instance) -> key
    synthesized: dict[str, str] = field(default_factory=dict)        # row group -> synthesis key
    adapters: list[Any] = field(default_factory=list)                # personalisation units with an adapter
    runs: dict[str, StageRun] = field(default_factory=dict)          # stage -> what it did

    def failed(self, stage: str) -> set[str]:
        """Keys of ``stage``'s units that failed in this pass (none when it has not run)."""
        return self.runs[stage].failed_keys() if stage in self.runs else set()


def record_stage(summary: Any, name: str, how: str, n_units: int, progress: Progress,
                 run: Callable[[], list[Outcome]]) -> list[Outcome]:
    """Time a stage, record its outcomes in the summary, and report its start and end."""
    t0 = time.perf_counter()
    progress.on_stage_start(name, n_units, how)
    outs = run()
    summary.record(name, outs, time.perf_counter() - t0)
    progress.on_stage_end(name, summary.stages[name], summary.timings[name], outs)
    return outs


def run_planned(stage: PlannedStage, scope: StageScope, executor: Executor, skip: set[str]) -> StageRun:
    """Plan ``stage``, leave out units whose key is in ``skip`` (run by the caller already, or
    counted as available), run the rest with ``executor`` (its stage runner when it declares one),
    record them in the summary, add their keys to ``skip`` and the run to ``scope.runs``."""
    planned = list(stage.plan())
    if stage.available is not None:
        stage.available([u for u in planned if u.key in skip])
    units = [u for u in planned if u.key not in skip]
    skip.update(u.key for u in units)
    if not units and not stage.always:
        run = StageRun(planned, [], [])
    else:
        job = StageJob(stage.name, stage.compute, scope.ctx, units, [stage.label(u) for u in units],
                       scope.progress, scope.plan, stage.resources or stage.name, scope.tracker)
        runner = executor.stage_runner(stage.name) if units else None
        outs = record_stage(scope.summary, stage.name, runner.how if runner is not None else "", len(units),
                            scope.progress, lambda: executor.run_stage(job))
        if stage.report is not None:
            stage.report(units, outs)
        run = StageRun(planned, units, outs)
    scope.runs[stage.name] = run
    return run
