"""The whole persrep job, behind ``ray_jobs/run_all.py`` and ``persrep run`` (one code path).

``ray job submit -- python ray_jobs/run_all.py --config paper ...`` on a cluster; on a laptop,
without ``RAY_ADDRESS``, it starts a local Ray cluster for the run. Settings: ``--config
NAME|FILE`` plus ``key.sub=value`` overrides; ``--data`` and ``--storage`` are shortcuts for
``data.path=`` and ``storage.root=``. ``--no-ray`` runs every unit in-process (Ray not imported).
Exit code: 0 all units finished, 1 some units failed (the summary names them), 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description="Run the whole persrep job: generator prep, "
                                "synthesis, personalisation, evaluation, summary and report.")
    p.add_argument("--config", default="local", help="named configuration or YAML path")
    p.add_argument("--data", default=None, help="data set dir, s3:// URI, PODS parquet dir or 'toy'")
    p.add_argument("--storage", default=None, help="storage root: local dir or s3://bucket/prefix")
    p.add_argument("--run-id", default=None, help="name of this run's results folder")
    p.add_argument("--no-ray", action="store_true", help="run every unit in this process")
    p.add_argument("--verbose", action="store_true", help="show Ray's, Tune's and MLflow's own output "
                   "here (default: in job.log in the run directory) and every progress message")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    return p.parse_args(argv)


def describe_cluster(started: bool) -> str:
    """One line: the cluster this job runs on, and whether it attached or started it."""
    import ray

    res = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    how = "started a local Ray cluster" if started else \
        f"attached to the Ray cluster at {ray.get_runtime_context().gcs_address}"
    return (f"ray: {how} ({nodes} node(s), {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs)")


def settings_overrides(args: argparse.Namespace) -> list[str]:
    """The user's ``key.sub=value`` overrides, then ``--data`` / ``--storage`` as the keys they set."""
    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.path={args.data}")
    if args.storage:
        overrides.append(f"storage.root={args.storage}")
    return overrides


def say(msg: str) -> None:
    """A progress line on stderr, timestamped (stdout keeps the summary table)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def log_path(ctx) -> str:
    """Where Ray's, Tune's and MLflow's own output goes: ``job.log`` in the run directory (a local
    temp file for an ``s3://`` root, copied into the run directory at the end)."""
    if not ctx.storage.is_s3:
        return ctx.storage.path("runs", ctx.run_id, "job.log")
    import tempfile

    return str(Path(tempfile.gettempdir()) / "persrep-logs" / f"{ctx.run_id}.log")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """The job, stopped cleanly by Ctrl-C / SIGTERM (exit 130 / 143; see :mod:`persrep.interrupt`)."""
    from persrep.interrupt import run_stoppable

    return run_stoppable(_main, argv, prog, "run_all",
                         "finished units are kept, unfinished ones have no manifest: run the same "
                         "command again to resume")


def _main(argv: list[str] | None = None, prog: str | None = None) -> int:
    from persrep.config import load_settings
    from persrep.console import Console
    from persrep.errors import UserError

    args = parse_args(argv, prog)
    overrides = settings_overrides(args)
    console = Console(verbose=args.verbose)
    try:
        settings = load_settings(args.config, overrides)
        from persrep.pipeline import run_pipeline
        from persrep.pipeline.context import prepare_run

        if settings.tracking.enabled and settings.tracking.required:  # down: stop before writing anything
            from persrep.tracking import Tracker

            Tracker.from_settings(settings, say=lambda _m: None).connect()
        if not args.no_ray:  # a wrong RAY_ADDRESS is refused now, not when the first unit computes
            from persrep.distributed.session import cluster_address

            cluster_address()
        # data, storage and model weights are checked here, before Ray and MLflow start
        ctx = prepare_run(settings, console, args.run_id)
        from persrep.generation.plan import data_configs

        console.aliases = {c.key: c.label for c in data_configs(settings)}  # readable status tables
        log = log_path(ctx)
        if not args.verbose:
            console.line(f"log: {log} (Ray, Tune and MLflow output; --verbose shows it here)")
        from persrep.runlock import RunLock

        with RunLock(ctx.storage, ctx.run_id, console.line), console.capture(log):
            if args.no_ray:
                summary = run_pipeline(settings, console, run_id=ctx.run_id, ctx=ctx)
            else:
                from persrep.distributed.ray_executor import RayExecutor
                from persrep.distributed.session import ensure_ray, release

                started: list[bool] = []

                def start() -> None:  # at the first unit to compute: a finished job starts no cluster
                    started.append(ensure_ray(settings.resources))
                    console(describe_cluster(started[0]))

                try:
                    executor = RayExecutor(settings.resources.max_retries, console, start=start)
                    summary = run_pipeline(settings, console, executor, run_id=ctx.run_id, ctx=ctx)
                finally:
                    release(any(started))
            console.summary(summary)
    except UserError as exc:
        print(f"{prog or 'run_all'}: {exc}", file=sys.stderr)
        return 2
    if ctx.storage.is_s3 and not args.verbose and Path(log).is_file():
        try:
            ctx.storage.write_bytes(f"runs/{ctx.run_id}/job.log", Path(log).read_bytes())
        except Exception:  # noqa: BLE001 - the results are written; the log stays local
            print(f"log kept at {log}", file=sys.stderr)
    return summary.exit_code


