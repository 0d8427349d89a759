"""Run a stage's units as Ray tasks: per-unit resources, bounded retries, progress, outcomes;
synthesis and personalisation through the stage runners the executor declares (Ray Data, Ray Tune).

Retries are driven from here (not by Ray's own ``max_retries``), so every retry, whether the
unit raised or its worker died (node lost, OOM, killed), is counted and reported. A unit's
function is idempotent (it skips a published unit and publishes atomically), so running it
again after a crash is always safe.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import ray

from persrep.distributed.session import cluster_gpus, node_shapes
from persrep.pipeline.executor import Executor, Outcome, StageRunner, failed_outcome, short_error
from persrep.pipeline.memory import NodeShape
from persrep.pipeline.progress import Progress, as_progress
from persrep.pipeline.resource_plan import Resources
from persrep.storage import StorageUnavailableError


@ray.remote
def _run_unit(fn: Callable[[Any, Any], dict[str, Any]], ctx: Any, unit: Any) -> dict[str, Any]:
    return fn(ctx, unit)


class RayExecutor(Executor):
    """Units as Ray tasks; synthesis on Ray Data and personalisation on Ray Tune (its stage runners)."""

    def __init__(self, max_retries: int = 2, progress: Progress | Callable[[str], None] | None = None,
                 step_hook: Any = None, start: Callable[[], Any] | None = None):
        """``start``: connects to / starts the cluster, called at the first unit there is to
        compute (the job passes it, so a re-run with every unit published starts no cluster;
        ``started`` says whether it was called). Without it Ray must be initialised already."""
        self.max_retries = max_retries
        self.progress = as_progress(progress)
        self.step_hook = step_hook  # passed to each personalisation trial (tune_stage.StepHook)
        self._start = start

    @property
    def started(self) -> bool:
        """Whether ``start`` was called (always True for an executor made without one)."""
        return self._start is None

    def before_compute(self) -> None:
        """Start the cluster (once), when the executor was made with ``start``."""
        start, self._start = self._start, None
        if start is not None:
            start()

    def stage_runner(self, stage: str) -> StageRunner | None:
        """Synthesis on a Ray Data actor pool (generators stay loaded across batches);
        personalisation as one Ray Tune trial per unit."""
        if stage == "synthesis":
            from persrep.distributed.synthesis import RayDataSynthesis

            return RayDataSynthesis(self.max_retries)
        if stage == "personalization":
            from persrep.distributed.tune_stage import TunePersonalization

            return TunePersonalization(self.max_retries, self.step_hook)
        return None

    def node_shapes(self) -> list[NodeShape]:
        self.before_compute()
        return node_shapes()

    def _options(self, resources: Resources) -> dict[str, Any]:
        memory = {"memory": int(resources.memory)} if resources.memory > 0 else {}
        if resources.gpus > 0 and cluster_gpus() > 0:
            return {"num_cpus": resources.cpus, "num_gpus": resources.gpus, **memory}
        return {"num_cpus": resources.cpus, "num_gpus": 0, **memory}

    def map(self, fn, ctx, units, labels, resources, stage) -> list[Outcome]:
        if not units:
            return []
        self.before_compute()
        opts = {**self._options(resources), "max_retries": 0, "name": f"persrep:{stage}"}
        task = _run_unit.options(**opts)
        ctx_ref = ray.put(ctx)
        started = {i: time.perf_counter() for i in range(len(units))}
        attempts = {i: 1 for i in range(len(units))}
        pending = {task.remote(fn, ctx_ref, units[i]): i for i in range(len(units))}
        outcomes: dict[int, Outcome] = {}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            ref = ready[0]
            i = pending.pop(ref)
            try:
                value = ray.get(ref)
                outcomes[i] = Outcome(labels[i], value.get("status", "done"), value, None, attempts[i],
                                      time.perf_counter() - started[i])
            except Exception as exc:  # noqa: BLE001 - task error or lost worker: retry, then report
                cause = getattr(exc, "cause", None) or exc
                if not self.policy.gives_up(cause, attempts[i], self.max_retries):
                    attempts[i] += 1
                    self.progress.on_retry(stage, labels[i], attempts[i], short_error(cause))
                    pending[task.remote(fn, ctx_ref, units[i])] = i
                    continue
                if isinstance(cause, StorageUnavailableError):
                    raise cause  # storage gone: no later unit can run; stop with its one line
                outcomes[i] = failed_outcome(labels[i], cause, attempts[i], time.perf_counter() - started[i],
                                             str(exc))  # remote traceback
            self.progress.on_unit(stage, len(outcomes), len(units), labels[i], outcomes[i].status)
        return [outcomes[i] for i in range(len(units))]
