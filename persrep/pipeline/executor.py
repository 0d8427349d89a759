"""The executor contract: where a stage's units run, and an outcome for each (done, skipped, failed).

:class:`Executor` declares everything the runner asks of an executor (nothing is probed):
``started`` (a lazy executor's cluster is not started yet), ``sequential`` (one unit at a time in
this process), ``node_shapes()`` (what units can run on), ``before_compute()`` (what must happen
once before the first unit computes: a lazy executor starts its cluster), ``map(...)`` (run one
function over units), ``stage_runner(stage)`` (a typed :class:`StageRunner` that runs a whole
stage its own way, or None) and ``run_stage(job)`` (a stage's units: its runner, else ``map``).

:class:`LocalExecutor` runs units one after another in this process (tests, debugging, a laptop
without Ray). ``persrep.distributed.ray_executor.RayExecutor`` runs the same functions as Ray tasks
and declares two stage runners (synthesis on Ray Data, personalisation on Ray Tune). Every executor
asks the one retry policy (:data:`persrep.pipeline.retry.POLICY`): a failing unit is retried
``max_retries`` times when another attempt could succeed, a failure the same inputs raise again is
reported after one attempt, and one failure never stops the stage; the summary says what failed and
why. The exception is a storage root that stays unreachable (:class:`StorageUnavailableError`): it
stops the job.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from persrep.pipeline.memory import GIB, NodeShape
from persrep.pipeline.progress import Progress, as_progress
from persrep.pipeline.resource_plan import LazyPlan, ResourcePlan, Resources, plan_resources
from persrep.pipeline.retry import POLICY, RetryPolicy
from persrep.pipeline.units import STAGE_AREAS
from persrep.storage import StorageUnavailableError


@dataclass
class Outcome:
    label: str
    status: str  # done | skipped | failed
    value: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    attempts: int = 1
    seconds: float = 0.0
    trace: str | None = None  # a failed unit's full traceback (run dir: failures/<unit>.txt)


class StageOutcomes(list):
    """``list[Outcome]`` (one per unit, in input order) plus ``stats`` for the whole stage
    (a stage runner's totals: rows, errors, generator loads, actors, ...)."""

    def __init__(self, outcomes: Sequence[Outcome] = (), stats: dict[str, Any] | None = None):
        super().__init__(outcomes)
        self.stats: dict[str, Any] = dict(stats or {})


def failed_outcome(label: str, exc: BaseException, attempts: int, seconds: float,
                   trace: str | None = None) -> Outcome:
    """A failed unit: its one-line error, its failure record (``UnitRejected.details``) as value,
    and the full traceback (written to ``failures/<unit>.txt`` in the run directory)."""
    return Outcome(label, "failed", dict(getattr(exc, "details", None) or {}), POLICY.error(exc), attempts,
                   seconds, trace)


def short_error(exc: BaseException) -> str:
    line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {line}"[:300]


@dataclass
class StageJob:
    """One stage's units handed to an executor: what computes a unit, the units and their labels,
    where progress goes, and the run's resource plan (``plan()``: made on first call, after the
    executor's ``before_compute()``)."""

    stage: str
    compute: Callable[[Any, Any], dict[str, Any]]
    ctx: Any
    units: list[Any]
    labels: list[str]
    progress: Progress
    plan: Callable[[], ResourcePlan]
    resource_stage: str = ""  # whose reservation a unit takes (default: ``stage``)
    tracker: Any = None  # the run's tracker (its parent run's tags for trials)

    def resources(self) -> Resources:
        return self.plan().unit(self.resource_stage or self.stage)


class StageRunner:
    """Runs every unit of one stage its own way instead of one ``map`` call per unit (in the
    spirit of Ray Train V2's typed callbacks). Returns one :class:`Outcome` per unit, in order."""

    how: str = ""  # said when the stage opens (e.g. "Ray Data")

    def run(self, job: StageJob) -> list[Outcome]:
        raise NotImplementedError


class Executor:
    """Runs a stage's units and reports an outcome for each (see the module docstring)."""

    sequential: bool = False  # one unit at a time in this process: memory never shared by two units
    max_retries: int = 0
    policy: RetryPolicy = POLICY

    @property
    def started(self) -> bool:
        """False while a lazy executor's cluster is not started (then the resource plan waits
        for a unit to compute)."""
        return True

    def node_shapes(self) -> list[NodeShape]:
        """What units can run on: one entry per node (CPUs, GPUs, memory offered to units)."""
        raise NotImplementedError

    def before_compute(self) -> None:
        """What must happen once before the first unit computes (nothing by default)."""

    def resource_plan(self, ctx: Any, progress: Callable[[str], None]) -> LazyPlan:
        """The run's resource plan (:func:`persrep.pipeline.resource_plan.plan_resources`): made
        now, or, while this executor is not ``started``, the first time a stage run asks for it
        (when some unit is left to compute)."""
        plan = LazyPlan(lambda: plan_resources(ctx, self, progress))
        if self.started:
            plan()
        return plan

    def map(self, fn: Callable[[Any, Any], dict[str, Any]], ctx: Any, units: Sequence[Any],
            labels: Sequence[str], resources: Resources, stage: str) -> list[Outcome]:
        raise NotImplementedError

    def stage_runner(self, stage: str) -> StageRunner | None:
        """The runner that runs the whole of ``stage`` its own way, or None (units are mapped)."""
        return None

    def run_stage(self, job: StageJob) -> list[Outcome]:
        """Every unit of ``job``: its stage runner when there is one, else ``map`` over the units
        not published yet (published units are skipped here, without a task:
        :func:`map_unfinished`); each unit's seconds and peak memory are measured where it runs."""
        from persrep.pipeline.unit_stats import Measured

        runner = self.stage_runner(job.stage) if job.units else None
        if runner is not None:
            return runner.run(job)

        def run(us: list[Any], ls: list[str]) -> list[Outcome]:
            self.before_compute()
            return self.map(Measured(job.compute), job.ctx, us, ls, job.resources(), job.stage)

        return map_unfinished(job.ctx, job.stage, job.units, job.labels, run, job.progress)


class LocalExecutor(Executor):
    sequential = True

    def __init__(self, max_retries: int = 0, progress: Progress | Callable[[str], None] | None = None,
                 verbose_errors: bool = False):
        self.max_retries = max_retries
        self.progress = as_progress(progress)
        self.verbose_errors = verbose_errors

    def node_shapes(self) -> list[NodeShape]:
        """This machine; units run one at a time, so a unit may use all of its memory."""
        import os

        import psutil

        return [NodeShape(float(os.cpu_count() or 1), 0.0, psutil.virtual_memory().total / GIB)]

    def map(self, fn, ctx, units, labels, resources, stage):
        outcomes = []
        for i, (unit, label) in enumerate(zip(units, labels)):
            t0 = time.perf_counter()
            for attempt in range(1, self.max_retries + 2):
                try:
                    value = fn(ctx, unit)
                    outcomes.append(Outcome(label, value.get("status", "done"), value, None, attempt,
                                            time.perf_counter() - t0))
                    break
                except Exception as exc:  # noqa: BLE001 - recorded, retried, reported
                    if self.verbose_errors:
                        traceback.print_exc()
                    if self.policy.gives_up(exc, attempt, self.max_retries):
                        if isinstance(exc, StorageUnavailableError):
                            raise  # storage gone: no later unit can run; stop with its one line
                        outcomes.append(failed_outcome(label, exc, attempt, time.perf_counter() - t0,
                                                       traceback.format_exc()))
                        break
            self.progress.on_unit(stage, i + 1, len(units), label, outcomes[-1].status)
        return outcomes


def map_unfinished(ctx: Any, stage: str, units: Sequence[Any], labels: Sequence[str],
                   run: Callable[[list[Any], list[str]], list[Outcome]],
                   progress: Progress | None = None) -> list[Outcome]:
    """Skip finished units on the driver: a re-run launches nothing for what is already published.

    Every unit function already returns ``skipped`` for a unit published intact, but only once it
    runs: with Ray that is a task per unit, and the first task on each worker pays the worker's
    start and imports (torch, timm, ...: seconds each). :func:`map_unfinished` asks the storage
    first (``is_intact``: the manifest, and each file's size and time, as the unit function would) and
    hands the executor only the units still to do; the others get the same ``skipped`` outcome the
    unit function would have returned. A stage with nothing left launches no task at all.

    Stages covered: those that go through ``executor.map`` and whose unit function's skip result is
    exactly ``{"status": "skipped", "key": key}`` (personalisation in-process; the Tune stage already
    skips published adapters up front). Synthesis is left out: the Ray Data stage skips published
    units up front, and the in-process unit's skip result carries the unit's counts (its verdict).

    Outcomes for ``units`` in order: ``skipped`` for the published ones (checked here, one
    progress event each), ``run(todo_units, todo_labels)`` for the rest (not called when nothing
    is left)."""
    area = STAGE_AREAS.get(stage)
    if area is None or not units:
        return run(list(units), list(labels)) if units else []
    outcomes: list[Outcome | None] = [None] * len(units)
    todo: list[int] = []
    for i, unit in enumerate(units):
        key = unit.key
        if key and ctx.storage.is_intact(area, key):
            outcomes[i] = Outcome(labels[i], "skipped", {"status": "skipped", "key": key}, seconds=0.0)
            if progress is not None:
                progress.on_unit(stage, i + 1, len(units), labels[i], "skipped")
        else:
            todo.append(i)
    if todo:
        for i, o in zip(todo, run([units[i] for i in todo], [labels[i] for i in todo])):
            outcomes[i] = o
    return outcomes  # type: ignore[return-value]
