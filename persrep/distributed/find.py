"""``persrep find`` on Ray: the scan on a Ray Data actor pool, per-instance steps as Ray tasks.

Also the entry point of ``ray_jobs/find.py`` and ``persrep find`` (one code path; ``--no-ray``
runs :class:`persrep.find.job.LocalRunner` and never imports Ray).

The scan: the driver lists the collection lazily (:func:`persrep.find.collection.iter_paths`)
and builds a dataset of *paths* only (blocks of ``16 x batch_size`` paths); ``map_batches``
runs :class:`ScanWorker` on ``ActorPoolStrategy(size=n)``: one actor per GPU when the cluster has
GPUs, else one per CPU at fractional ``resources.cpus_per_actor`` (sizing shared with the
synthesis stage, :func:`persrep.distributed.synthesis.pool_shape`). Each actor loads the backbone
once with every adapter of the scan (:class:`persrep.find.models.Extractors`), reads the photos'
bytes itself, and writes the embeddings it computes to the cache before returning the batch's
scores. The driver keeps only (path, hash, error, scores) per photo.

Faults: a dead actor is restarted (``max_restarts``) and its in-flight batch re-run
(``max_task_retries``), both set explicitly from ``--retries`` (Ray Data's default would retry
forever); the re-run batch finds the embeddings its dead predecessor already wrote. The driver
drops repeated paths. User exceptions never escape the UDF (unreadable photos become rows), so
anything escaping is a bug and fails the job; a re-run then resumes from the cache.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import pyarrow as pa

__all__ = ["ScanWorker", "RayRunner", "parse_args", "main"]


class ScanWorker:
    """The actor of the scan pool: one :class:`~persrep.find.scan.Scanner` per actor."""

    def __init__(self, plan: Any, torch_threads: int = 1, scanner_factory: Callable | None = None):
        from persrep.find.scan import Scanner

        self.scanner = (scanner_factory or Scanner)(plan, torch_threads=torch_threads)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.scanner(batch.column("path").to_pylist())


@contextmanager
def _data_context(no_progress_timeout_s: float, retries: int):
    import ray

    dctx = ray.data.DataContext.get_current()
    names = ("execution_no_progress_timeout_s", "wait_for_min_actors_s",
             "max_consecutive_actor_init_deaths", "actor_task_retry_on_errors", "enable_progress_bars")
    saved = {k: getattr(dctx, k) for k in names}
    try:
        dctx.execution_no_progress_timeout_s = float(no_progress_timeout_s)
        dctx.wait_for_min_actors_s = int(no_progress_timeout_s)
        dctx.max_consecutive_actor_init_deaths = retries
        dctx.actor_task_retry_on_errors = False
        dctx.enable_progress_bars = False  # the job prints its own progress lines
        yield
    finally:
        for k, v in saved.items():
            setattr(dctx, k, v)


class RayRunner:
    """Runs :func:`persrep.find.job.run_find`'s heavy steps on the Ray cluster in use."""

    name = "ray"

    def __init__(self, *, num_actors: int | None = None, use_gpus: bool | None = None,
                 max_retries: int = 2, scanner_factory: Callable | None = None,
                 torch_threads: int | None = None, no_progress_timeout_s: float = 1800.0):
        self.num_actors, self.use_gpus, self.max_retries = num_actors, use_gpus, max_retries
        self.scanner_factory, self.torch_threads = scanner_factory, torch_threads
        self.no_progress_timeout_s = no_progress_timeout_s
        self.stats: dict[str, Any] = {}

    @property
    def parallelism(self) -> int:
        import ray

        return self.num_actors or max(1, int(ray.cluster_resources().get("CPU", 1)))

    def _task(self, fn: Callable):
        import ray

        return ray.remote(fn).options(num_cpus=0.5, max_retries=self.max_retries)

    def call(self, fn: Callable, *args: Any) -> Any:
        import ray

        return ray.get(self._task(fn).remote(*args))

    def map(self, fn: Callable, arg_lists: list[tuple]) -> list[Any]:
        import ray

        task = self._task(fn)
        return ray.get([task.remote(*a) for a in arg_lists])

    def scan(self, plan: Any, path_batches: Iterator[list[str]], say: Callable[[str], None]) -> Iterator[pa.Table]:
        import ray

        from persrep.distributed.synthesis import pool_shape

        listed = list(path_batches)  # paths only: the listing, never the bytes
        n_batches = len(listed)
        n, per = pool_shape(SimpleNamespace(settings=plan.source.settings), n_batches,
                            self.num_actors, self.use_gpus)
        if per["num_gpus"]:  # never ask for more GPU actors than GPUs: the pool would wait forever
            n = min(n, int(ray.cluster_resources().get("GPU", 1)))
        # blocks of whole batches, at least 4 per actor so every actor gets work, at most 64 batches
        per_block = max(1, min(64, n_batches // (4 * n)))
        blocks = [pa.table({"path": [p for b in listed[k:k + per_block] for p in b]})
                  for k in range(0, n_batches, per_block)]
        threads = self.torch_threads or max(1, int(per["num_cpus"]))
        each = "1 GPU" if per["num_gpus"] else f"{per['num_cpus']:g} CPU"
        say(f"scan: {sum(t.num_rows for t in blocks)} photos in {n_batches} batches on {n} actor(s) ({each} each)")
        self.stats = {"actors": n, "batches": n_batches}
        retries = max(1, self.max_retries)
        seen: set[str] = set()
        with _data_context(self.no_progress_timeout_s, retries), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*ray_remote_args. is deprecated")
            ds = ray.data.from_arrow(blocks).map_batches(
                ScanWorker, batch_size=plan.batch_size, batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=n),
                fn_constructor_kwargs={"plan": plan, "torch_threads": threads,
                                       "scanner_factory": self.scanner_factory},
                num_cpus=per["num_cpus"], num_gpus=per["num_gpus"] or None,
                max_restarts=2 * retries + 1, max_task_retries=retries)
            for out in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                paths = out.column("path").to_pylist()
                fresh = [i for i, p in enumerate(paths) if p not in seen]
                seen.update(paths)
                if len(fresh) < len(paths):
                    self.stats["duplicates"] = self.stats.get("duplicates", 0) + len(paths) - len(fresh)
                    out = out.take(fresh)
                yield out

    def close(self) -> None:
        pass


# -- entry point --------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description="Find your personalised objects in a photo "
                                "collection: scores, a calibrated yes/no per photo, boxes and masks "
                                "on the top hits, hits.parquet and find.html.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a finished run: <storage root>/runs/<run_id> (local or s3://)")
    src.add_argument("--adapter", help="one adapter: <storage root>/adapters/<key>")
    p.add_argument("--photos", required=True, help="photo collection: a directory or s3://bucket/prefix")
    p.add_argument("--instances", default=None, help="comma-separated instances (default: all of the run)")
    p.add_argument("--data-config", default=None,
                   help="use this data configuration's adapters (default: the best per instance by the run's AP)")
    p.add_argument("--backbone", default=None, help="backbone name when the run used several")
    p.add_argument("--model", default="personalised", choices=["personalised", "pretrained", "both"],
                   help="which model decides (personalised: the pretrained backbone is scanned too and "
                   "decides the likely tier; both: the same, kept for scripts)")
    p.add_argument("--out", default=None, help="output directory (default <root>/finds/<find id>)")
    p.add_argument("--cache", default=None, help="embedding cache root (default: the run's storage root)")
    p.add_argument("--top-k", type=int, default=8, help="hits per instance that get a box and mask")
    p.add_argument("--borderline", type=int, default=4, help="borderline photos shown per instance")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--actors", type=int, default=None, help="scan actors (default: one per GPU, else per CPU)")
    p.add_argument("--retries", type=int, default=2, help="actor restarts / task retries")
    p.add_argument("--s3-endpoint", default=None, help="S3 endpoint (default $AWS_ENDPOINT_URL)")
    p.add_argument("--no-tracking", action="store_true", help="no MLflow run")
    p.add_argument("--guard", type=float, default=0.20, help="flag an object found in more than this "
                   "share of the photos (default 0.20)")
    from persrep.find.expand import DEFAULT_EXPAND

    p.add_argument("--expand", type=int, default=DEFAULT_EXPAND, help="after a first decision, each object's "
                   "best N hits join its reference photos and every photo is scored and decided again "
                   f"(query expansion; default {DEFAULT_EXPAND}, 0 = off)")
    p.add_argument("--no-ray", action="store_true", help="everything in this process")
    p.add_argument("--verbose", action="store_true", help="show Ray's own output here (default: in "
                   "find.log in the output directory)")
    return p.parse_args(argv)


def options_from_args(args: argparse.Namespace):
    from persrep.find.job import FindOptions

    return FindOptions(photos=args.photos, run=args.run, adapter=args.adapter,
                       instances=[s for s in args.instances.split(",") if s] if args.instances else None,
                       data_config=args.data_config, backbone=args.backbone, model=args.model,
                       out=args.out, cache=args.cache, top_k=args.top_k, borderline=args.borderline,
                       batch_size=args.batch_size, s3_endpoint=args.s3_endpoint,
                       tracking=not args.no_tracking, guard=args.guard,
                       expand=args.expand)


def print_result(res: Any, out: Callable[[str], None] = print) -> None:
    s = res.summary
    width = max([len(k) for k in s["instances"]] + [8])
    out(f"{'object':<{width}} {'likely':>7} {'possible':>8}  note")
    for inst, v in s["instances"].items():
        out(f"{inst:<{width}} {v['likely']:>7} {v['possible']:>8}  {'FLAGGED (see find.html)' if v['flag'] else ''}")
    out(f"\nsearched {s['images_scanned']} photos ({s['unreadable']} unreadable, skipped) at "
        f"{s['throughput_images_per_s']:.1f}/s; outputs: {res.out}/find.html, {res.out}/hits.csv")
    for u in s["unreadable_files"][:20]:
        out(f"UNREADABLE {u['path']}: {u['error']}")
    for inst, why in s.get("flagged", {}).items():
        out(f"FLAGGED {inst}: {why}")


def log_path(out: str) -> str:
    """Where Ray's own output goes: ``find.log`` in the output directory (a local temp file for an
    ``s3://`` output, copied there at the end)."""
    from pathlib import Path

    if out.startswith("s3://"):
        import tempfile

        return str(Path(tempfile.gettempdir()) / "persrep-logs" / f"find-{out.rstrip('/').rsplit('/', 1)[-1]}.log")
    from persrep.storage import Storage

    return Storage(out).path("find.log")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    from persrep.console import Console
    from persrep.errors import UserError
    from persrep.find.job import LocalRunner, prepare_find, run_find
    from persrep.find.source import FindError

    args = parse_args(argv, prog)
    console = Console(verbose=args.verbose)
    started = False
    try:
        opts = options_from_args(args)
        prepared = prepare_find(opts)  # every check before Ray (or any model) starts
        log = log_path(prepared.out)
        if not args.no_ray and not args.verbose:
            console.line(f"log: {log} (Ray's own output; --verbose shows it here)")
        with console.capture(None if args.no_ray else log):
            try:
                if args.no_ray:
                    runner: Any = LocalRunner()
                else:
                    from persrep.distributed.job import describe_cluster
                    from persrep.distributed.session import ensure_ray

                    started = ensure_ray(None)
                    console(describe_cluster(started))
                    runner = RayRunner(num_actors=args.actors, max_retries=args.retries)
                res = run_find(opts, runner, console, prepared)
            finally:
                if started:
                    from persrep.distributed.session import release

                    release(started)
            print_result(res, console.print_out)
    except (FindError, UserError) as exc:
        print(f"{prog or 'find'}: {exc}", file=sys.stderr)
        return 2
    if prepared.out.startswith("s3://") and not args.verbose and not args.no_ray:
        from pathlib import Path

        if Path(log).is_file():
            try:
                prepared.out_storage.write_bytes("find.log", Path(log).read_bytes())
            except Exception:  # noqa: BLE001 - the results are written; the log stays local
                print(f"log kept at {log}", file=sys.stderr)
    return 0
