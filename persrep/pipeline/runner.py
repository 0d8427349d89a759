"""The whole job: a loop over the stage list (``persrep.pipeline.sequence.STAGES``), then results.

Stages run through an executor (in-process, or Ray tasks); every unit is keyed and skipped when
already published, so a re-run after a crash redoes only what is missing. The run's results
land at ``<root>/runs/<run_id>/`` (``persrep.pipeline.results``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from persrep.config import Settings
from persrep.pipeline.context import RunContext, prepare_run
from persrep.pipeline.executor import Executor, LocalExecutor
from persrep.pipeline.planned import StageScope
from persrep.pipeline.progress import Progress, as_progress
from persrep.pipeline.results import RunSummary, write_results
from persrep.pipeline.sequence import STAGES, run_stages


def run_pipeline(settings: Settings, progress: Progress | Callable[[str], None] | None = None,
                 executor: Executor | None = None, run_id: str | None = None,
                 ctx: RunContext | None = None) -> RunSummary:
    """``ctx``: a context from :func:`prepare_run` (data validated before Ray and MLflow start)."""
    from persrep.tracking import Tracker

    say = as_progress(progress)
    t_start = time.perf_counter()
    tracker = Tracker.from_settings(settings, say=say).connect()  # required + down: fails here
    ctx = ctx or prepare_run(settings, say, run_id)
    for note in ctx.notes:
        say(note)
    executor = executor or LocalExecutor(settings.resources.max_retries, say)
    lazy = not executor.started  # its cluster not started: the plan waits for a unit to compute
    plan = executor.resource_plan(ctx, say)
    summary = RunSummary(ctx.run_id, notes=list(ctx.notes))
    if tracker.degraded and tracker.warning:
        summary.notes.append(f"tracking degraded: {tracker.warning}")
    tracker.start_parent(f"{settings.name}-{ctx.run_id}", settings, tags={"persrep.run_id": ctx.run_id})
    try:
        run_stages(STAGES, StageScope(ctx, summary, say, plan, tracker), executor)
    except BaseException:
        tracker.end("FAILED")
        raise
    if lazy and not executor.started:
        say("nothing to compute: every unit was published earlier (no cluster started, no memory plan)")
        summary.notes.append("nothing to compute: every unit was published earlier; no Ray cluster started")
    summary.timings["total"] = round(time.perf_counter() - t_start, 2)
    write_results(ctx, summary, tracker)
    tracker.end("FINISHED" if not summary.failures else "FAILED")
    for r in summary.retries:
        say(f"RETRIED {r['stage']} {r['unit']}: {r['attempts']} attempts, {r['status']}")
    for f in summary.failures:
        say(f"FAILED {f['stage']} {f['unit']} after {f['attempts']} attempt(s): {f['error']}")
    return summary
