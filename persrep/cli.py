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

from persrep.config import available_configs, load_settings, settings_to_dict
from persrep.errors import UserError


def _progress(msg: str) -> None:
    print(f"  {msg}", file=sys.stderr, flush=True)


def _add_auto_mask_args(p: argparse.ArgumentParser) -> None:
    """--auto-masks for a command that writes a data set: predict its missing train masks after."""
    p.add_argument("--auto-masks", action="store_true",
                   help="predict the missing train masks after writing the data set (persrep data masks)")
    p.add_argument("--segmenter", default="grabcut", help="with --auto-masks: grabcut (default) or sam")
    p.add_argument("--model", default=None, help="with --auto-masks: SAM model id or local directory")


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
    if args.auto_masks:
        from persrep.segmentation.cli import auto_masks_after_import

        return auto_masks_after_import(args, res.dest, _progress)
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from persrep.data.check import check_dataset

    report = check_dataset(args.path, deep=not args.shallow, expect_train=args.expect_train,
                           dense_tasks=args.dense)
    print(report.summary())
    return report.exit_code


def cmd_data_masks(args: argparse.Namespace) -> int:
    from persrep.segmentation.cli import cmd_data_masks as run

    return run(args, _progress)


def cmd_data_composite(args: argparse.Namespace) -> int:
    from persrep.data.composite import cmd_data_composite as run

    return run(args)


def cmd_data_pods(args: argparse.Namespace) -> int:
    from persrep.data.pods import materialize_pods

    dest = materialize_pods(args.src, args.dest, progress=_progress, info_file=args.info)
    print(f"PODS written in the reference layout to {dest}")
    return 0


def cmd_data_df2(args: argparse.Namespace) -> int:
    from persrep.data.df2 import convert_df2

    res = convert_df2(args.src, args.dest, categories=args.categories, min_shop=args.min_shop,
                      min_user=args.min_user, max_instances=args.max_instances, progress=_progress)
    print(res.line())
    return 0


def cmd_data_dogs(args: argparse.Namespace) -> int:
    from persrep.data.dogs import convert_dogs

    res = convert_dogs(args.src, args.dest, masks=args.masks, min_images=args.min_images,
                       max_dogs=args.max_dogs, train_count=args.train_count, progress=_progress)
    print(res.line("dogs"))
    if args.auto_masks:
        from persrep.segmentation.cli import auto_masks_after_import

        return auto_masks_after_import(args, res.dest, _progress)
    return 0


# -- captions ------------------------------------------------------------------------------------
def cmd_captions_generate(args: argparse.Namespace) -> int:
    from persrep.captions.command import run

    return run(args, _progress)


# -- run -----------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    """The same job as ``ray_jobs/run_all.py`` (its arguments, its Ray handling, its exit codes)."""
    from persrep.distributed.job import main as job_main

    return job_main(args.job_args, prog="persrep run")


def cmd_sweep(args: argparse.Namespace) -> int:
    """The same sweep as ``ray_jobs/sweep.py`` (its arguments, its Ray handling, its exit codes)."""
    from persrep.distributed.sweep_job import main as sweep_main

    return sweep_main(args.job_args, prog="persrep sweep")


def cmd_find(args: argparse.Namespace) -> int:
    """The same job as ``ray_jobs/find.py`` (its arguments, its Ray handling, its exit codes)."""
    from persrep.distributed.find import main as find_main

    return find_main(args.job_args, prog="persrep find")


# subcommands that are whole jobs: the same code as their ray_jobs/ entry point, options and all
JOB_COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "run": (cmd_run, "run the whole pipeline: the same job as ray_jobs/run_all.py"),
    "sweep": (cmd_sweep, "a Ray Tune sweep over settings: the same as ray_jobs/sweep.py"),
    "find": (cmd_find, "find your objects in a photo collection: the same job as ray_jobs/find.py"),
}


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
    _add_auto_mask_args(p)
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_data_import)

    p = data.add_parser("masks", help="predict missing masks with a segmenter (labelled as predicted)")
    p.add_argument("src", help="data set in the reference layout (local or s3://), written in place")
    p.add_argument("--segmenter", default=None, help="grabcut (default, no weights), sam or persam")
    p.add_argument("--model", default=None, help="SAM/PerSAM: model id (HF cache) or local directory")
    p.add_argument("--test", action="store_true", help="also test_masks/ (dense tasks; labelled predicted)")
    p.add_argument("--overwrite", action="store_true", help="replace existing masks, provided ones too")
    _add_settings_args(p)
    p.set_defaults(func=cmd_data_masks)

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
    p.add_argument("--info", default=None, help="the released pods_info.json (val/test split of the "
                   "objects, categories); default SRC/pods_info.json when present")
    p.set_defaults(func=cmd_data_pods)

    p = data.add_parser("df2", help="DeepFashion2 (image/ + annos/) -> reference layout: one "
                        "instance per garment (pair_id, style), 3 shop images train, user images test")
    p.add_argument("src", help="DF2 split folder with image/NNNNNN.jpg and annos/NNNNNN.json")
    p.add_argument("dest")
    p.add_argument("--categories", default="short sleeve top,long sleeve top",
                   help="DF2 category names kept (comma-separated; default: the shirt categories)")
    p.add_argument("--min-shop", type=int, default=3, help="shop images a garment needs (train = 3 of them)")
    p.add_argument("--min-user", type=int, default=3, help="user (consumer) images a garment needs (test)")
    p.add_argument("--max-instances", type=int, default=None, help="keep the first N garments (by pair_id)")
    p.set_defaults(func=cmd_data_df2)

    p = data.add_parser("dogs", help="DogFaceNet (one folder of face crops per dog) -> reference layout")
    p.add_argument("src", help="SRC/<dog id>/<image>")
    p.add_argument("dest")
    p.add_argument("--masks", default=None, help="folder of masks mirroring SRC (<dog id>/<stem>.png)")
    p.add_argument("--min-images", type=int, default=5, help="images a dog needs (3 train + test)")
    p.add_argument("--max-dogs", type=int, default=80, help="keep at most N dogs (most images first; the paper: 80)")
    p.add_argument("--train-count", type=int, default=3)
    _add_auto_mask_args(p)
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_data_dogs)

    cap = sub.add_parser("captions", help="LLM-written captions").add_subparsers(dest="sub", required=True)
    p = cap.add_parser("generate", help="write a captions file (JSON keyed by category, each caption "
                       "with <new1>) with a transformers model or an OpenAI-compatible endpoint")
    from persrep.captions.command import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_captions_generate)

    for name, (func, what) in JOB_COMMANDS.items():  # each job parses its own options
        p = sub.add_parser(name, add_help=False, help=f"{what} (persrep {name} --help lists its options)")
        p.add_argument("job_args", nargs=argparse.REMAINDER)
        p.set_defaults(func=func)

    p = sub.add_parser("report", help="HTML + markdown report of a finished run")
    p.add_argument("run", help="run directory: <storage root>/runs/<run_id> (local or s3://)")
    p.add_argument("--out", default=None, help="output directory (default RUN/report)")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if argv[:1] and argv[0] in JOB_COMMANDS:  # argparse's REMAINDER would drop leading options
        args = argparse.Namespace(func=JOB_COMMANDS[argv[0]][0], job_args=argv[1:])
    else:
        args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except UserError as exc:  # settings, data, storage, models, tracking: one line, exit 2
        print(f"persrep: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("persrep: interrupted; finished units are kept, re-run to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
