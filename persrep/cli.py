"""The ``persrep`` command line: settings, data sets, runs and reports.

Every command that takes settings accepts ``--config NAME|FILE`` and trailing ``key.sub=value``
overrides. Errors print one line per problem and exit non-zero; no traceback for user errors.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import yaml

from persrep.config import ConfigError, available_configs, load_settings, settings_to_dict


def _progress(msg: str) -> None:
    print(f"  {msg}", file=sys.stderr, flush=True)


def _add_settings_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="local",
                   help=f"named configuration ({', '.join(available_configs())}) or a YAML path")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="settings overrides, e.g. synthesis.cfg=[4,5] personalization.max_steps=10")


# -- config --------------------------------------------------------------------------------------
def cmd_config_show(args: argparse.Namespace) -> int:
    settings = load_settings(args.config, args.overrides)
    print(yaml.safe_dump(settings_to_dict(settings), sort_keys=False), end="")
    return 0


def cmd_config_list(args: argparse.Namespace) -> int:
    for name in available_configs():
        print(name)
    return 0


# -- data ----------------------------------------------------------------------------------------
def cmd_data_toy(args: argparse.Namespace) -> int:
    from persrep.data.toy import write_toy_from_settings

    settings = load_settings(args.config, [f"data.toy.{o}" if not o.startswith("data.") else o
                                           for o in args.overrides])
    t0 = time.perf_counter()
    dest = write_toy_from_settings(args.dest, settings.data.toy, progress=_progress)
    print(f"toy world written to {dest} in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_data_import(args: argparse.Namespace) -> int:
    from persrep.data.importer import import_folder

    t0 = time.perf_counter()
    res = import_folder(args.src, args.dest, train_count=args.train_count,
                        train_indices=args.train_indices, masks=args.masks,
                        categories=args.categories, category=args.category,
                        skip_bad=args.skip_bad, progress=_progress if args.verbose else None)
    print(f"imported {res.instances} instances ({res.train_images} train, {res.test_images} test "
          f"images, {res.masks} masks) into {res.dest} in {time.perf_counter() - t0:.1f} s")
    for line in res.notes:
        print(f"  note: {line}")
    for line in res.skipped:
        print(f"  skipped: {line}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from persrep.data.check import check_dataset

    report = check_dataset(args.path, deep=not args.shallow, expect_train=args.expect_train,
                           dense_tasks=args.dense)
    print(report.summary())
    return report.exit_code


def cmd_data_composite(args: argparse.Namespace) -> int:
    from persrep.data.composite import cmd_data_composite as run

    return run(args)


def cmd_data_pods(args: argparse.Namespace) -> int:
    from persrep.data.pods import materialize_pods

    dest = materialize_pods(args.src, args.dest, progress=_progress)
    print(f"PODS written in the reference layout to {dest}")
    return 0


# -- run -----------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    """The same job as ``ray_jobs/run_all.py`` (its arguments, its Ray handling, its exit codes)."""
    from persrep.distributed.job import main as job_main

    return job_main(args.job_args, prog="persrep run")


def cmd_find(args: argparse.Namespace) -> int:
    """The same job as ``ray_jobs/find.py`` (its arguments, its Ray handling, its exit codes)."""
    from persrep.distributed.find import main as find_main

    return find_main(args.job_args, prog="persrep find")


def cmd_report(args: argparse.Namespace) -> int:
    from persrep.report import main_report

    main_report(args.run, args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="persrep", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    cfg = sub.add_parser("config", help="show or list settings").add_subparsers(dest="sub", required=True)
    p = cfg.add_parser("show", help="print the resolved settings as YAML")
    _add_settings_args(p)
    p.set_defaults(func=cmd_config_show)
    cfg.add_parser("list", help="list the named configurations").set_defaults(func=cmd_config_list)

    data = sub.add_parser("data", help="data sets").add_subparsers(dest="sub", required=True)
    p = data.add_parser("toy", help="write the procedural toy world (the embedded default data set)")
    p.add_argument("dest")
    p.add_argument("--config", default="local")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="toy settings, e.g. seed=3 categories=2 image_size=64")
    p.set_defaults(func=cmd_data_toy)

    p = data.add_parser("import", help="folder-per-instance photos -> reference layout")
    p.add_argument("src", help="SRC/<instance>/<image> files")
    p.add_argument("dest", help="new directory to create")
    p.add_argument("--train-count", type=int, default=3, help="first N images by name train (default 3)")
    p.add_argument("--train-indices", default=None, help="explicit train positions, e.g. 0,24,48")
    p.add_argument("--masks", default=None, help="folder of masks mirroring SRC")
    p.add_argument("--categories", default=None,
                   help="category mapping: prompts_and_classes.txt, CSV instance,category, or JSON")
    p.add_argument("--category", default=None, help="one category for every instance")
    p.add_argument("--skip-bad", action="store_true", help="leave unreadable images out instead of stopping")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_data_import)

    p = data.add_parser("check", help="validate a data set (exit 0 clean, 1 warnings, 2 errors)")
    p.add_argument("path", help="data set directory or s3:// URI")
    p.add_argument("--shallow", action="store_true", help="read headers only (faster)")
    p.add_argument("--expect-train", type=int, default=3)
    p.add_argument("--dense", action="store_true", help="warn when dense-task masks are missing")
    p.set_defaults(func=cmd_data_check)

    p = data.add_parser("composite", help="harder test scenes: objects pasted (exact masks) on real "
                        "backgrounds in the four PODS scenes; disjoint training backgrounds")
    p.add_argument("src", help="data set with train/test masks (e.g. imported COIL)")
    p.add_argument("backgrounds", help="folder of background photos (split into disjoint halves)")
    p.add_argument("dest")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=224, help="side of the composited images (px)")
    p.add_argument("--test-per-instance", type=int, default=24)
    p.add_argument("--dense-per-instance", type=int, default=0)
    p.add_argument("--distractor-instances", default="3",
                   help="held-out instances used only as distractors: a count or comma-separated names")
    p.add_argument("--negative-instances", default="0",
                   help="held-out instances written only as negatives: a count or names")
    p.add_argument("--negatives-per-instance", type=int, default=24)
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_data_composite)

    p = data.add_parser("pods", help="PODS parquet export -> reference layout")
    p.add_argument("src")
    p.add_argument("dest")
    p.set_defaults(func=cmd_data_pods)

    p = sub.add_parser("run", add_help=False,
                       help="run the whole pipeline: the same job as ray_jobs/run_all.py "
                            "(persrep run --help lists its options)")
    p.add_argument("job_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("find", add_help=False,
                       help="find your objects in a photo collection: the same job as ray_jobs/find.py "
                            "(persrep find --help lists its options)")
    p.add_argument("job_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_find)

    p = sub.add_parser("report", help="HTML + markdown report of a finished run")
    p.add_argument("run", help="run directory: <storage root>/runs/<run_id> (local or s3://)")
    p.add_argument("--out", default=None, help="output directory (default RUN/report)")
    p.set_defaults(func=cmd_report)
    return parser


def _model_errors() -> tuple[type[Exception], ...]:
    """One-line user errors from the model registries and tracking (no traceback)."""
    from persrep.models.diffusion import ModelUnavailableError
    from persrep.models.errors import ModelError
    from persrep.tracking import TrackingError

    return (ModelError, ModelUnavailableError, TrackingError)


def main(argv: list[str] | None = None) -> int:
    from persrep.data.layout import DatasetError
    from persrep.storage import StorageError

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if argv[:1] == ["run"]:  # the job parses its own options (argparse's REMAINDER drops leading ones)
        args = argparse.Namespace(func=cmd_run, job_args=argv[1:])
    elif argv[:1] == ["find"]:
        args = argparse.Namespace(func=cmd_find, job_args=argv[1:])
    else:
        args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ConfigError, DatasetError, StorageError, *_model_errors()) as exc:
        print(f"persrep: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("persrep: interrupted; finished units are kept, re-run to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
