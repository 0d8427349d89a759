"""A Ray Tune sweep over persrep settings: ``python ray_jobs/sweep.py --space tune_spaces/toy.yaml``,
or ``persrep sweep --space ...`` (the same code).

The space file (see ``tune_spaces/README.md``) names a base configuration, the metric to optimise
(``task.metric``; objective = the mean over instances of the personalised backbone's value), the
search (grid, random, optuna), optional ASHA early stopping over instances, and the swept keys.
Everything is validated first (one line per problem, exit 2); then the synthetic data of every
data configuration in the space is generated once, then the trials run on Ray Tune. Also runs
inside ``ray job submit``; without ``RAY_ADDRESS`` it starts a local Ray cluster.
``--data`` and ``--storage`` are shortcuts for ``data.path=`` and ``storage.root=``; trailing
``key.sub=value`` overrides go on top of the space file's ``overrides:``.
Exit code: 0 every trial finished (or was stopped early), 1 some trial or data unit failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--space", required=True, help="sweep space YAML, e.g. tune_spaces/toy.yaml")
    p.add_argument("--data", default=None, help="data set dir, s3:// URI, PODS parquet dir or 'toy'")
    p.add_argument("--storage", default=None, help="storage root: local dir or s3://bucket/prefix")
    p.add_argument("--name", default=None, help="run id of this sweep (default: a timestamp); the "
                   "Tune experiment is <storage>/sweeps/<space name>-<run id>")
    p.add_argument("--check", action="store_true", help="validate the space and settings, then exit")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    return p.parse_args(argv)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """The sweep, stopped cleanly by Ctrl-C / SIGTERM (exit 130 / 143; see :mod:`persrep.interrupt`)."""
    from persrep.interrupt import run_stoppable

    return run_stoppable(_main, argv, prog, "sweep",
                         "finished units are kept: run the same command again to resume")


def _main(argv: list[str] | None = None, prog: str | None = None) -> int:
    from persrep.errors import UserError
    from persrep.generation.plan import PlanError
    from persrep.sweep.space import SweepError, load_space

    from persrep.distributed.job import say, settings_overrides

    args = parse_args(argv, prog)
    overrides = settings_overrides(args)
    try:
        space = load_space(args.space, overrides)
        if args.check:
            print(f"sweep space {args.space}: ok ({len(space.data_keys)} data key(s), "
                  f"{len(space.trial_keys)} trial key(s), {len(space.data_combinations())} data "
                  f"combination(s), search {space.spec.search})")
            return 0
        from persrep.distributed.session import ensure_ray, release
        from persrep.distributed.sweep import run_sweep
        from persrep.sweep.results import format_trials

        from persrep.pipeline.paths import resolve_settings_paths
        from persrep.runlock import RunLock
        from persrep.storage import Storage

        root = Storage.from_settings(resolve_settings_paths(space.base).storage)
        with RunLock(root, args.name or "sweep", say, command="sweep"):  # one job per storage root
            started = ensure_ray(space.base.resources)
            try:
                result = run_sweep(space, say, name=args.name)
            finally:
                release(started)
    except (UserError, PlanError) as exc:
        text = str(exc)  # one line per problem; a SweepError's lines already name the space file
        print(text if isinstance(exc, SweepError) else f"sweep: {text}", file=sys.stderr)
        return 2
    print(format_trials(space, result.trials, result.best))
    print(f"\n{result.data.line()}")
    print(f"results: {result.output_uri}   tune experiment: {result.experiment_path}")
    for note in result.notes:
        print(note)
    return result.exit_code

