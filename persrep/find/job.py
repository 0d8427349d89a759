"""The find job without Ray: resolve the run, calibrate, scan, decide, localise, write outputs.

:func:`run_find` is the one code path of ``persrep find`` and ``ray_jobs/find.py``. The heavy
steps are handed to a *runner*: :class:`LocalRunner` runs them in this process (``--no-ray``);
:class:`persrep.distributed.find.RayRunner` runs the scan on a Ray Data actor pool and the
per-instance steps as Ray tasks. Outputs (``<out>/``): ``hits.parquet``, ``scores.parquet``,
``unreadable.parquet``, ``summary.json``, ``find.html``, then ``MANIFEST.json`` last (a find
without a manifest is unfinished; a re-run replaces it). Embeddings are cached under the cache
root (default: the run's storage root), so a re-run or an interrupted job resumes.
"""

from __future__ import annotations

import io
import json
import resource
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from persrep.config import content_key
from persrep.find.calibrate import calibrate
from persrep.find.collection import Collection, iter_paths
from persrep.find.localize import localize_many
from persrep.find.scan import ScanPlan, Scanner
from persrep.find.source import FindError, FindSource, resolve_adapter, resolve_run
from persrep.storage import MANIFEST, Storage

__all__ = ["FindOptions", "FindResult", "LocalRunner", "run_find", "batches", "driver_peak_mb"]

Say = Callable[[str], None]
FINDS = "finds"


@dataclass
class FindOptions:
    photos: str
    run: str | None = None
    adapter: str | None = None
    instances: list[str] | None = None
    data_config: str | None = None
    backbone: str | None = None
    model: str = "personalised"  # or "pretrained"; "both" scores with both (the benchmark)
    out: str | None = None
    cache: str | None = None  # embedding cache root (default: the run's storage root)
    top_k: int = 8
    borderline: int = 4
    batch_size: int = 32
    share_trunk: bool = True
    s3_endpoint: str | None = None
    tracking: bool = True

    def check(self) -> None:
        if bool(self.run) == bool(self.adapter):
            raise FindError("give exactly one of --run RUN_DIR or --adapter DIR")
        if self.model not in ("personalised", "pretrained", "both"):
            raise FindError(f"--model {self.model}: choose personalised, pretrained or both")
        for name, v in (("--top-k", self.top_k), ("--batch-size", self.batch_size)):
            if v < 1:
                raise FindError(f"{name} {v}: must be >= 1")
        if self.borderline < 0:
            raise FindError(f"--borderline {self.borderline}: must be >= 0")


@dataclass
class FindResult:
    out: str
    summary: dict[str, Any]
    hits: pa.Table = field(repr=False, default=None)  # type: ignore[assignment]
    scores: pa.Table = field(repr=False, default=None)  # type: ignore[assignment]


def driver_peak_mb() -> float:
    """This process's peak resident memory (ru_maxrss, KiB on Linux) in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def batches(paths: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for p in paths:
        chunk.append(p)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def calibrate_task(source: FindSource, pairs: list[tuple[str, str]], share_trunk: bool):
    from persrep.find.models import Extractors
    from persrep.find.scan import ScanPlan

    plan = ScanPlan(source, Collection("."), ".", pairs)
    ex = Extractors(source, plan.specs, share_trunk)
    return calibrate(ex, source, pairs)


class LocalRunner:
    """Every step in this process (``--no-ray``)."""

    name = "in-process"

    def call(self, fn: Callable, *args: Any) -> Any:
        return fn(*args)

    def map(self, fn: Callable, arg_lists: list[tuple]) -> list[Any]:
        return [fn(*a) for a in arg_lists]

    def scan(self, plan: ScanPlan, path_batches: Iterator[list[str]], say: Say) -> Iterator[pa.Table]:
        scanner = Scanner(plan)
        for paths in path_batches:
            yield scanner(paths)

    def close(self) -> None:
        pass


def _source(opts: FindOptions) -> FindSource:
    if opts.adapter:
        return resolve_adapter(opts.adapter, s3_endpoint=opts.s3_endpoint)
    return resolve_run(opts.run or "", instances=opts.instances, data_config=opts.data_config,
                       backbone=opts.backbone, pretrained=opts.model == "pretrained",
                       s3_endpoint=opts.s3_endpoint)


def _pairs(source: FindSource, model: str) -> list[tuple[str, str]]:
    pairs = []
    for t in source.targets:
        if model in ("pretrained", "both"):
            pairs.append(("pretrained", t.instance))
        if model in ("personalised", "both") and t.adapter_key:
            pairs.append((t.instance, t.instance))
    return pairs


def _table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _out_unit(out: str, s3_endpoint: str | None) -> tuple[Storage, str, str]:
    parent, _, key = out.rstrip("/").rpartition("/")
    root, _, stage = parent.rpartition("/")
    if not key or not stage or not root:
        raise FindError(f"--out {out}: give a directory at least two levels deep (e.g. runs/finds/mine)")
    try:
        return Storage(root, s3_endpoint), stage, key
    except ValueError as exc:
        raise FindError(f"--out {out}: {exc}") from None


def run_find(opts: FindOptions, runner: Any = None, say: Say | None = None) -> FindResult:
    say = say or (lambda _m: None)
    runner = runner or LocalRunner()
    t0 = time.perf_counter()
    opts.check()
    source = _source(opts)
    collection = Collection(opts.photos.rstrip("/"), opts.s3_endpoint or source.s3_endpoint)
    try:
        collection.storage  # noqa: B018 - validates the URI
    except ValueError as exc:
        raise FindError(f"--photos {opts.photos}: {exc}") from None
    listing: dict[str, int] = {}
    first = iter_paths(collection, listing)
    try:
        head = next(first, None)
    except ValueError as exc:
        raise FindError(str(exc)) from None
    if head is None:
        raise FindError(f"--photos {opts.photos}: no photos found (extensions: jpg, png, webp, heic, ...)")
    pairs = _pairs(source, opts.model)
    find_id = content_key("find", source.key(), collection.uri, pairs, opts.top_k, opts.borderline)
    out = (opts.out or f"{source.root}/{FINDS}/{find_id}").rstrip("/")
    out_st, out_stage, out_key = _out_unit(out, opts.s3_endpoint or source.s3_endpoint)
    out_st.check_writable()
    cache_root = opts.cache or source.root
    say(f"find: {len(source.targets)} instance(s) of run {source.run_id} "
        f"({', '.join(f'{t.instance}:{t.data_config}' for t in source.targets)}), "
        f"model {opts.model}, photos {collection.uri}, runner {runner.name}")

    t_cal = time.perf_counter()
    references, calibrations, cal_info = runner.call(calibrate_task, source, pairs, opts.share_trunk)
    for (model, inst), c in calibrations.items():
        say(f"calibration {inst} ({'pretrained' if model == 'pretrained' else 'personalised'}): "
            f"threshold {c.threshold:.3f} (F1 {c.f1:.2f} on {c.positives} positives / {c.negatives} negatives)")
    t_cal = time.perf_counter() - t_cal

    plan = ScanPlan(source, collection, cache_root, pairs, references, opts.batch_size, opts.share_trunk)

    def all_paths() -> Iterator[str]:
        yield head
        yield from first

    paths, hashes, errors, score_rows = [], [], [], []
    embedded, workers = 0, set()
    t_scan = time.perf_counter()
    for table in runner.scan(plan, batches(all_paths(), opts.batch_size), say):
        d = table.to_pydict()
        paths += d["path"]
        hashes += d["content_hash"]
        errors += d["error"]
        score_rows += d["scores"]
        embedded += sum(d["embedded"])
        workers.update(d["worker"])
        if len(paths) % (opts.batch_size * 20) < len(d["path"]):
            say(f"scan: {len(paths)} photos")
    t_scan = time.perf_counter() - t_scan
    say(f"scan: {len(paths)} photos in {t_scan:.1f} s ({len(paths) / max(t_scan, 1e-9):.1f}/s), "
        f"{sum(e is not None for e in errors)} unreadable, {embedded} embeddings computed")

    order = np.argsort(np.asarray(paths, dtype=object), kind="stable")  # deterministic output order
    paths = [paths[i] for i in order]
    hashes = [hashes[i] for i in order]
    errors = [errors[i] for i in order]
    score_rows = [score_rows[i] for i in order]
    ok = np.asarray([e is None for e in errors], dtype=bool)
    S = np.full((len(paths), len(pairs)), np.nan, dtype=np.float32)
    for i, row in enumerate(score_rows):
        if row is not None:
            S[i] = row
    primary = [j for j, (m, _) in enumerate(pairs) if (opts.model == "pretrained") == (m == "pretrained")]

    # top hits and borderline cases per instance (primary model), localised by the dense head
    picks: dict[int, dict[str, list[int]]] = {}
    for j in primary:
        model, inst = pairs[j]
        thr = calibrations[(model, inst)].threshold
        idx = np.flatnonzero(ok)
        s = S[idx, j]
        by_score = idx[np.argsort(-s, kind="stable")]
        hits_idx = [int(i) for i in by_score if S[i, j] >= thr]
        top = hits_idx[: opts.top_k]
        rest = [int(i) for i in by_score if int(i) not in set(top)]
        rest.sort(key=lambda i: (abs(float(S[i, j]) - thr), paths[i]))
        picks[j] = {"top": top, "borderline": rest[: opts.borderline]}
    t_loc = time.perf_counter()
    jobs = [(pairs[j][0], pairs[j][1], [paths[i] for i in p["top"] + p["borderline"]]) for j, p in picks.items()]
    n_chunks = max(1, min(len(jobs), getattr(runner, "parallelism", 1)))
    chunks = [jobs[k::n_chunks] for k in range(n_chunks)] if jobs else []
    done = runner.map(localize_many, [(source, collection, c) for c in chunks])
    by_job = {(m, inst): r for c, rs in zip(chunks, done) for (m, inst, _), r in zip(c, rs)}
    located = {j: by_job[pairs[j]] for j in picks}
    t_loc = time.perf_counter() - t_loc

    hit_rows: list[dict[str, Any]] = []
    per_instance: dict[str, Any] = {}
    for j in primary:
        model, inst = pairs[j]
        cal = calibrations[(model, inst)]
        dec = ok & (S[:, j] >= cal.threshold)
        loc = located.get(j, {"reason": None, "hits": {}})
        shown = set(picks[j]["top"]) | set(picks[j]["borderline"])
        rank = {i: r for r, i in enumerate(sorted(np.flatnonzero(ok), key=lambda i: -S[i, j]))}
        for i in sorted(set(np.flatnonzero(dec).tolist()) | shown, key=lambda i: -S[i, j]):
            l = loc["hits"].get(paths[i], {})
            hit_rows.append({"path": paths[i], "instance": inst, "model": "pretrained" if model == "pretrained"
                             else "personalised", "score": float(S[i, j]), "threshold": cal.threshold,
                             "decision": bool(dec[i]), "rank": int(rank[i]),
                             "top": i in set(picks[j]["top"]), "borderline": i in set(picks[j]["borderline"]),
                             "box": l.get("box"), "mask_rle": l.get("mask_rle"),
                             "mask_size": l.get("mask_size"), "content_hash": hashes[i]})
        t = next(t for t in source.targets if t.instance == inst)
        per_instance[inst] = {"model": "pretrained" if model == "pretrained" else "personalised",
                              "adapter_key": t.adapter_key, "data_config": t.data_config,
                              "run_ap": t.run_ap, "hits": int(dec.sum()), "calibration": cal.as_dict(),
                              "localization": loc["reason"] or f"{len(loc['hits'])} photos localised"}
    hits = pa.Table.from_pylist(hit_rows, schema=HITS_SCHEMA)
    long = {"path": [], "content_hash": [], "model": [], "instance": [], "score": [], "threshold": [],
            "decision": []}
    okp = [p for p, g in zip(paths, ok) if g]
    okh = [h for h, g in zip(hashes, ok) if g]
    for j, (model, inst) in enumerate(pairs):
        thr = calibrations[(model, inst)].threshold
        s = S[ok, j]
        long["path"] += okp
        long["content_hash"] += okh
        long["model"] += ["pretrained" if model == "pretrained" else "personalised"] * len(okp)
        long["instance"] += [inst] * len(okp)
        long["score"] += s.tolist()
        long["threshold"] += [thr] * len(okp)
        long["decision"] += (s >= thr).tolist()
    scores = pa.table(long)
    unreadable = pa.table({"path": [p for p, e in zip(paths, errors) if e is not None],
                           "error": [e for e in errors if e is not None]})
    summary = {
        "find_id": out_key, "out": out, "run": source.run_uri, "photos": collection.uri,
        "model": opts.model, "runner": runner.name, "workers": len(workers),
        "images_listed": listing.get("listed", len(paths)), "files_ignored": listing.get("ignored", 0),
        "images_scanned": int(ok.sum()), "unreadable": int((~ok).sum()),
        "unreadable_files": [{"path": p, "error": e} for p, e in zip(paths, errors) if e is not None][:200],
        "embeddings_computed": int(embedded), "embeddings_reused": int(ok.sum()) * len({m for m, _ in pairs}) - int(embedded),
        "throughput_images_per_s": round(len(paths) / max(t_scan, 1e-9), 2),
        "seconds": {"calibration": round(t_cal, 2), "scan": round(t_scan, 2), "localization": round(t_loc, 2),
                    "total": round(time.perf_counter() - t0, 2)},
        "calibration": cal_info, "instances": per_instance,
        "thresholds": {f"{m}:{i}": c.threshold for (m, i), c in calibrations.items()},
        "driver_peak_rss_mb": round(driver_peak_mb(), 1), "cache_root": cache_root,
    }
    from persrep.find.gallery import gallery_html

    page = gallery_html(source, collection, summary, hits).encode()
    _track(opts, source, summary, page, say)
    files = {"hits.parquet": _table_bytes(hits), "scores.parquet": _table_bytes(scores),
             "unreadable.parquet": _table_bytes(unreadable), "find.html": page,
             "summary.json": json.dumps(summary, indent=1, default=str).encode()}
    if out_st.is_finished(out_stage, out_key):  # a re-run replaces the previous find
        out_st.fs.delete_file(out_st.path(out_st.unit_rel(out_stage, out_key), MANIFEST))
    out_st.publish(out_stage, out_key, files, {"kind": "find", "run": source.run_uri, "photos": collection.uri})
    say(f"find: {sum(v['hits'] for v in per_instance.values())} hits; wrote {out}/hits.parquet and {out}/find.html")
    return FindResult(out, summary, hits, scores)


HITS_SCHEMA = pa.schema([("path", pa.string()), ("instance", pa.string()), ("model", pa.string()),
                         ("score", pa.float32()), ("threshold", pa.float32()), ("decision", pa.bool_()),
                         ("rank", pa.int32()), ("top", pa.bool_()), ("borderline", pa.bool_()), ("box", pa.list_(pa.int32())),
                         ("mask_rle", pa.string()), ("mask_size", pa.list_(pa.int32())),
                         ("content_hash", pa.string())])


def _track(opts: FindOptions, source: FindSource, summary: dict[str, Any], page: bytes, say: Say) -> None:
    """One MLflow run per find job: parameters, headline metrics, the gallery as an artifact."""
    if not opts.tracking or not source.settings.tracking.enabled:
        return
    import tempfile
    from pathlib import Path

    from persrep.tracking import Tracker

    tracker = Tracker(source.settings.tracking, source.root, say=say).connect()
    run_id = tracker.start_parent(f"find-{summary['find_id']}", None,
                                  tags={"persrep.kind": "find", "persrep.run_id": source.run_id})
    if run_id is None:
        return
    tracker.log_params({"run": source.run_uri, "photos": summary["photos"], "model": opts.model,
                        "instances": ",".join(source.names), "top_k": opts.top_k,
                        "runner": summary["runner"], "out": summary["out"]})
    tracker.log_metrics({"images_scanned": summary["images_scanned"], "unreadable": summary["unreadable"],
                         "throughput_images_per_s": summary["throughput_images_per_s"],
                         **{f"hits.{k}": v["hits"] for k, v in summary["instances"].items()},
                         **{f"threshold.{k}": v["calibration"]["threshold"] for k, v in summary["instances"].items()}})
    with tempfile.TemporaryDirectory(prefix="persrep-find-") as tmp:
        (Path(tmp) / "find.html").write_bytes(page)
        (Path(tmp) / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        tracker.log_artifact(Path(tmp) / "find.html")
        tracker.log_artifact(Path(tmp) / "summary.json")
    tracker.end("FINISHED")
    summary["mlflow_run_id"] = run_id
