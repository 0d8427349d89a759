"""Executors run a stage's units and report an outcome for each: done, skipped or failed.

:class:`LocalExecutor` runs units one after another in this process (tests, debugging, a
laptop without Ray). ``persrep.distributed.ray_executor.RayExecutor`` runs the same functions
as Ray tasks with resources and retries. Both retry a failing unit ``max_retries`` times when
another attempt could succeed (``persrep.pipeline.retry``: a failure the same inputs raise again
is reported after one attempt) and never stop the stage for one failure: the summary says what failed and why. The exception is
a storage root that stays unreachable (:class:`StorageUnavailableError`): it stops the job.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from persrep.pipeline.memory import GIB, NodeShape
from persrep.pipeline.retry import POLICY, is_retryable
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


@dataclass
class Resources:
    cpus: float = 1.0
    gpus: float = 0.0
    memory: float = 0.0  # bytes of host memory the unit reserves (Ray's `memory` resource); 0 = none


def failed_outcome(label: str, exc: BaseException, attempts: int, seconds: float,
                   trace: str | None = None) -> Outcome:
    """A failed unit: its one-line error, its failure record (``UnitRejected.details``) as value,
    and the full traceback (written to ``failures/<unit>.txt`` in the run directory)."""
    error = POLICY.line(exc) if not is_retryable(exc) else short_error(exc)
    return Outcome(label, "failed", dict(getattr(exc, "details", None) or {}), error, attempts, seconds, trace)


class StageHooks:
    """Stages an executor may run its own way instead of mapping their units one at a time,
    declared here (in the spirit of Ray Train V2's typed callbacks) rather than probed for.
    ``None`` (the default) = the runner maps the stage's units with ``Executor.map``.

    - ``synthesis_stage(ctx, units, progress) -> list[Outcome]``: every synthesis unit at once
      (RayExecutor: a Ray Data actor pool that keeps generators loaded);
    - ``run_personalization(ctx, units, labels, tracker) -> list[Outcome]``: every personalisation
      unit (RayExecutor: one Ray Tune trial per unit).

    Both return one :class:`Outcome` per unit, in order, as ``map`` would.
    """

    synthesis_stage: Callable[[Any, list[Any], Callable[[str], None]], list[Outcome]] | None = None
    run_personalization: Callable[[Any, list[Any], list[str], Any], list[Outcome]] | None = None


def stage_hooks(executor: Any) -> StageHooks:
    """The executor's stage hooks; an executor that implements only ``map`` has none."""
    return executor if isinstance(executor, StageHooks) else StageHooks()


class Executor(Protocol):
    """Runs a stage's units and reports an outcome for each; may declare :class:`StageHooks`."""

    def map(self, fn: Callable[[Any, Any], dict[str, Any]], ctx: Any, units: Sequence[Any],
            labels: Sequence[str], resources: Resources, stage: str) -> list[Outcome]: ...

    def node_shapes(self) -> list[NodeShape]:
        """What units can run on: one entry per node (CPUs, GPUs, memory offered to units)."""
        ...


def short_error(exc: BaseException) -> str:
    line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {line}"[:300]


class LocalExecutor(StageHooks):
    sequential = True  # one unit at a time: memory is never shared between two units
    def __init__(self, max_retries: int = 0, progress: Callable[[str], None] | None = None,
                 verbose_errors: bool = False):
        self.max_retries = max_retries
        self.progress = progress or (lambda _m: None)
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
                    if attempt > self.max_retries or not is_retryable(exc):
                        if isinstance(exc, StorageUnavailableError):
                            raise  # storage gone: no later unit can run; stop with its one line
                        outcomes.append(failed_outcome(label, exc, attempt, time.perf_counter() - t0,
                                                       traceback.format_exc()))
                        break
            self.progress(f"{stage}: {i + 1}/{len(units)} {label} -> {outcomes[-1].status}")
        return outcomes
