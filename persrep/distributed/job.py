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


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description="Run the whole persrep job: generator prep, "
                                "synthesis, personalisation, evaluation, summary and report.")
    p.add_argument("--config", default="local", help="named configuration or YAML path")
    p.add_argument("--data", default=None, help="data set dir, s3:// URI, PODS parquet dir or 'toy'")
    p.add_argument("--storage", default=None, help="storage root: local dir or s3://bucket/prefix")
    p.add_argument("--run-id", default=None, help="name of this run's results folder")
    p.add_argument("--no-ray", action="store_true", help="run every unit in this process")
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


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    from persrep.cli import _model_errors
    from persrep.config import ConfigError, load_settings
    from persrep.data.layout import DatasetError
    from persrep.storage import StorageError

    args = parse_args(argv, prog)
    overrides = settings_overrides(args)
    try:
        settings = load_settings(args.config, overrides)
        from persrep.pipeline import run_pipeline

        if args.no_ray:
            summary = run_pipeline(settings, say, run_id=args.run_id)
        else:
            from persrep.distributed.ray_executor import RayExecutor
            from persrep.distributed.session import ensure_ray, release

            started = ensure_ray(settings.resources)
            say(describe_cluster(started))
            try:
                executor = RayExecutor(settings.resources.max_retries, say)
                summary = run_pipeline(settings, say, executor, run_id=args.run_id)
            finally:
                release(started)
    except (ConfigError, DatasetError, StorageError, *_model_errors()) as exc:
        print(f"{prog or 'run_all'}: {exc}", file=sys.stderr)
        return 2
    print(summary.table)
    print(f"\nresults: {summary.run_uri}   stages: {summary.stages}   total {summary.timings.get('total')} s")
    for r in summary.retries:
        print(f"RETRIED {r['stage']} {r['unit']}: {r['attempts']} attempts, {r['status']}")
    for f in summary.failures:
        print(f"FAILED {f['stage']} {f['unit']}: {f['error']}")
    return summary.exit_code


