"""A stage, one shape for all of them: plan its units, compute one unit, report how it went.

Every stage of the pipeline is a list of keyed, idempotent units and a function that computes
one (``persrep/pipeline/work.py`` and friends). :class:`PlannedStage` says that once: ``plan``
(the units, each with a ``key``), ``compute`` (one unit, mapped by the executor), ``label`` (the
unit's name in progress lines, the summary and ``units.json``), whose memory reservation a unit
takes, an optional executor *stage hook* that runs the whole stage its own way (Ray Data for
synthesis; declared on :class:`persrep.pipeline.executor.StageHooks`), and ``report`` (what the
stage adds to the summary afterwards). :func:`run_planned` runs one with either executor.

Units are frozen dataclasses deriving :class:`persrep.pipeline.units.Unit`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from persrep.pipeline.executor import Executor, Outcome, Resources, stage_hooks

Progress = Callable[[str], None]


@dataclass(frozen=True)
class PlannedStage:
    """One stage: ``plan() -> units``, ``compute(ctx, unit) -> outcome value``, ``label(unit)``."""

    name: str
    plan: Callable[[], Sequence[Any]]
    compute: Callable[[Any, Any], dict[str, Any]]
    label: Callable[[Any], str]
    resources: str | None = None  # whose memory reservation a unit takes (default: ``name``)
    hook: str | None = None  # a StageHooks method that may run the whole stage instead of ``map``
    how: str = ""  # said when the hook runs the stage (e.g. "Ray Data")
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


def record_stage(summary: Any, name: str, how: str, n_units: int, say: Progress,
                 run: Callable[[], list[Outcome]]) -> list[Outcome]:
    """Time a stage, record its outcomes in the summary, and say how it went."""
    t0 = time.perf_counter()
    say(f"stage {name}: {n_units} units{f' ({how})' if how else ''}")
    outs = run()
    summary.record(name, outs, time.perf_counter() - t0)
    c = summary.stages[name]
    say(f"stage {name}: {c['done']} done, {c['skipped']} skipped (finished earlier), "
        f"{c['failed']} failed in {summary.timings[name]:.1f} s")
    if callable(getattr(say, "stage_outcomes", None)):  # persrep.console: per-instance table
        say.stage_outcomes(name, outs)
    return outs


def map_stage(summary: Any, executor: Executor, name: str, fn: Callable[[Any, Any], dict[str, Any]],
              ctx: Any, units: Sequence[Any], labels: Sequence[str],
              resources: Resources | Callable[[], Resources], say: Progress) -> list[Outcome]:
    """A stage whose units the executor maps over (in-process loop or Ray tasks); units already
    published are skipped here, without a task (pipeline/finished.py); each unit's seconds and
    peak memory are measured where it runs (pipeline/unit_stats.py).

    When some unit is left to compute, the executor's ``before_compute()`` runs first (a lazy
    executor's memory plan and cluster start), then ``resources`` is read (a callable: read then,
    so it sees that plan)."""
    from persrep.pipeline.finished import map_unfinished
    from persrep.pipeline.unit_stats import Measured

    def run(us: list[Any], ls: list[str]) -> list[Outcome]:
        before_compute(executor)
        res = resources() if callable(resources) else resources
        return executor.map(Measured(fn), ctx, us, ls, res, name)

    return record_stage(summary, name, "", len(units), say, lambda: map_unfinished(ctx, name, units, labels, run, say))


def before_compute(executor: Any) -> None:
    """The executor's ``before_compute()``, when it has one: what must happen once before the
    first unit computes (RayExecutor made lazy: the run's memory plan, the cluster's start)."""
    hook = getattr(executor, "before_compute", None)
    if hook is not None:
        hook()


def run_planned(stage: PlannedStage, ctx: Any, executor: Executor, summary: Any, say: Progress,
                skip: set[str], resources: Callable[[Any, str], Resources]) -> StageRun:
    """Plan ``stage``, leave out units whose key is in ``skip`` (run by the caller already, or
    counted as available), run the rest with ``executor`` (its stage hook when it has one), record
    them in ``summary`` and add their keys to ``skip``."""
    planned = list(stage.plan())
    if stage.available is not None:
        stage.available([u for u in planned if u.key in skip])
    units = [u for u in planned if u.key not in skip]
    skip.update(u.key for u in units)
    if not units and not stage.always:
        return StageRun(planned, [], [])
    hook = getattr(stage_hooks(executor), stage.hook) if stage.hook else None
    if hook is not None and units:
        outs = record_stage(summary, stage.name, stage.how, len(units), say, lambda: hook(ctx, units, say))
    else:
        outs = map_stage(summary, executor, stage.name, stage.compute, ctx, units,
                         [stage.label(u) for u in units], lambda: resources(ctx, stage.resources or stage.name), say)
    if stage.report is not None:
        stage.report(units, outs)
    return StageRun(planned, units, outs)
