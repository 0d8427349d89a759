"""Run a stage's units as Ray tasks: per-unit resources, bounded retries, progress, outcomes.

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
from persrep.pipeline.memory import NodeShape
from persrep.pipeline.executor import Outcome, Resources, StageHooks, failed_outcome, short_error
from persrep.pipeline.retry import is_retryable
from persrep.storage import StorageUnavailableError


@ray.remote
def _run_unit(fn: Callable[[Any, Any], dict[str, Any]], ctx: Any, unit: Any) -> dict[str, Any]:
    return fn(ctx, unit)


class RayExecutor(StageHooks):
    """Units as Ray tasks; synthesis on Ray Data and personalisation on Ray Tune (its StageHooks)."""

    def __init__(self, max_retries: int = 2, progress: Callable[[str], None] | None = None,
                 step_hook: Any = None, start: Callable[[], Any] | None = None):
        """``start``: connects to / starts the cluster, called at the first unit there is to
        compute (the job passes it, so a re-run with every unit published starts no cluster;
        ``started`` says whether it was called). Without it Ray must be initialised already."""
        self.max_retries = max_retries
        self.progress = progress or (lambda _m: None)
        self.step_hook = step_hook  # passed to each personalisation trial (tune_stage.StepHook)
        self._start = start
        # what must happen before the first unit computes; the runner sets it to its memory plan
        # (which asks node_shapes, so starts the cluster); by default it starts the cluster
        self.before_compute: Callable[[], None] = self._ensure_started

    @property
    def started(self) -> bool:
        """Whether ``start`` was called (always True for an executor made without one)."""
        return self._start is None

    def _ensure_started(self) -> None:
        start, self._start = self._start, None
        if start is not None:
            start()

    def synthesis_stage(self, ctx: Any, units: list[Any], progress: Callable[[str], None]) -> list[Outcome]:
        """Stage 2 on a Ray Data actor pool (generators stay loaded across batches)."""
        from persrep.distributed.synthesis import run_synthesis_stage

        return run_synthesis_stage(ctx, units, progress, self.max_retries, before_work=self._before_work)

    def _before_work(self) -> None:
        self.before_compute()
        self._ensure_started()

    def node_shapes(self) -> list[NodeShape]:
        self._ensure_started()
        return node_shapes()

    def _options(self, resources: Resources) -> dict[str, Any]:
        memory = {"memory": int(resources.memory)} if resources.memory > 0 else {}
        if resources.gpus > 0 and cluster_gpus() > 0:
            return {"num_cpus": resources.cpus, "num_gpus": resources.gpus, **memory}
        return {"num_cpus": resources.cpus, "num_gpus": 0, **memory}

    def run_personalization(self, ctx: Any, units: list[Any], labels: list[str],
                            tracker: Any = None) -> list[Outcome]:
        """Stage 3 as Ray Tune trials (persrep.distributed.tune_stage); the runner calls this."""
        from persrep.distributed.tune_stage import run_personalization_stage

        return run_personalization_stage(
            ctx, units, self.progress, self.max_retries, labels=labels,
            tracking_tags=tracker.parent_run_tags() if tracker is not None else None,
            data_parallel_workers=ctx.settings.resources.data_parallel_workers, step_hook=self.step_hook,
            before_work=self._before_work)

    def map(self, fn, ctx, units, labels, resources, stage) -> list[Outcome]:
        if not units:
            return []
        self._ensure_started()
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
                if attempts[i] <= self.max_retries and is_retryable(cause):
                    attempts[i] += 1
                    self.progress(f"{stage}: retrying {labels[i]} (attempt {attempts[i]}): {short_error(cause)}")
                    pending[task.remote(fn, ctx_ref, units[i])] = i
                    continue
                if isinstance(cause, StorageUnavailableError):
                    raise cause  # storage gone: no later unit can run; stop with its one line
                outcomes[i] = failed_outcome(labels[i], cause, attempts[i], time.perf_counter() - started[i],
                                             str(exc))  # remote traceback
            self.progress(f"{stage}: {len(outcomes)}/{len(units)} {labels[i]} -> {outcomes[i].status}")
        return [outcomes[i] for i in range(len(units))]
