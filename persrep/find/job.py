"""The find job without Ray: check, embed the references, scan, decide, localise, write outputs.

:func:`prepare_find` does every check that needs no model and no cluster (the CLI calls it before
Ray starts); :func:`run_find` is the one code path of ``persrep find`` and ``ray_jobs/find.py``.
The heavy steps are handed to a *runner*: :class:`LocalRunner` runs them in this process
(``--no-ray``); :class:`persrep.distributed.find.RayRunner` runs the scan on a Ray Data actor
pool and the per-instance steps as Ray tasks. Outputs (``<out>/``, any local directory or
``s3://`` prefix): ``hits.parquet``, ``hits.csv``, ``scores.parquet`` (every photo x instance
score, rival, z, margin and tier: :func:`persrep.find.calibrate.decide` reruns on it),
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
from persrep.find.calibrate import (AGREE_Z, GUARD_SHARE, LIKELY_M, LIKELY_Z, POSSIBLE_Z, RULE,
                                    decide_pairs)
from persrep.find.collection import Collection, iter_paths
from persrep.find.expand import DEFAULT_EXPAND, EXPAND_RULE, expanded_references, expansion_sets
from persrep.find.localize import localize_many
from persrep.find.scan import ScanPlan, Scanner, score_pairs
from persrep.find.source import FindError, FindSource, resolve_adapter, resolve_run
from persrep.storage import MANIFEST, Manifest, Storage, StorageError, sha256_bytes

__all__ = ["FindOptions", "FindResult", "LocalRunner", "Prepared", "prepare_find", "run_find", "batches",
           "driver_peak_mb"]

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
    model: str = "personalised"  # or "pretrained"; the pretrained backbone is always scanned ("both" = personalised)
    out: str | None = None
    cache: str | None = None  # embedding cache root (default: the run's storage root)
    top_k: int = 8
    borderline: int = 4
    batch_size: int = 32
    share_trunk: bool = True
    s3_endpoint: str | None = None
    tracking: bool = True
    guard: float = GUARD_SHARE  # an instance hit in more than this share of the photos is flagged
    expand: int = DEFAULT_EXPAND  # hits per object that join its references (persrep/find/expand.py); 0 = off

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
        if self.expand < 0:
            raise FindError(f"--expand {self.expand}: photos added per object, 0 (off) or more")
        if not 0 < self.guard <= 1:
            raise FindError(f"--guard {self.guard}: a share of the photos, in (0, 1] (default {GUARD_SHARE})")
        for name, v in (("--photos", self.photos), ("--out", self.out), ("--cache", self.cache)):
            if v is not None:
                from persrep.storage import validate_root_uri

                try:
                    validate_root_uri(v)
                except ValueError as exc:
                    raise FindError(f"{name} {v}: {exc}") from None


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


def references_task(source: FindSource, models: list[str], share_trunk: bool,
                    batch_size: int = 32) -> dict[str, tuple[np.ndarray, list[str]]]:
    """Every instance's reference photos of the run's data set, embedded under each model:
    ``{model: ([R, D] embeddings, owner instance of each row)}``. The instance's own rows score a
    photo; the other instances' rows are its rivals (:mod:`persrep.find.calibrate`)."""
    import torch

    from persrep.find.models import Extractors
    from persrep.find.scan import ScanPlan

    ds = source.dataset
    owners = [n for n in ds.names for _ in ds.instances[n].train]
    images = [ds.read_image(p) for n in ds.names for p in ds.instances[n].train]
    plan = ScanPlan(source, Collection("."), ".", [(m, m) for m in models])
    ex = Extractors(source, plan.specs, share_trunk)
    feats: dict[str, list[np.ndarray]] = {m: [] for m in models}
    for start in range(0, len(images), batch_size):
        batch = torch.stack([ex.transform(im) for im in images[start:start + batch_size]])
        out = ex.global_features(batch, models)
        for m in models:
            feats[m].append(out[m])
    return {m: (np.concatenate(v), owners) for m, v in feats.items()}


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
    """The score columns: the pretrained backbone always (it decides the *likely* tier with a
    personalised model, :mod:`persrep.find.calibrate`), each instance's adapter unless pretrained."""
    pairs = []
    for t in source.targets:
        pairs.append(("pretrained", t.instance))
        if model in ("personalised", "both") and t.adapter_key:
            pairs.append((t.instance, t.instance))
    return pairs


def _table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _out_dir(out: str, s3_endpoint: str | None) -> Storage:
    """Any directory, local (relative or absolute, any depth) or ``s3://bucket[/prefix]``."""
    try:
        return Storage(out, s3_endpoint)
    except ValueError as exc:
        raise FindError(f"--out {out}: {exc}") from None


@dataclass
class Prepared:
    """What :func:`prepare_find` checked, before any cluster or model starts."""

    source: FindSource
    collection: Collection
    paths: Iterator[str]  # the listing, its first photo already read (so an empty one is refused)
    listing: dict[str, int]
    pairs: list[tuple[str, str]]
    out: str
    out_storage: Storage
    cache_root: str


def prepare_find(opts: FindOptions) -> Prepared:
    """Every check of ``persrep find`` that needs no model and no cluster: options, the run, the
    collection (exists, holds at least one photo), the output directory (writable), the cache.
    Raises :class:`FindError` (one line naming the option and the fix)."""
    opts.check()
    source = _source(opts)
    endpoint = opts.s3_endpoint or source.s3_endpoint
    collection = Collection(opts.photos.rstrip("/"), endpoint)
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
    except Exception as exc:  # noqa: BLE001 - an unreachable bucket: one line
        raise FindError(f"--photos {opts.photos}: {str(exc).splitlines()[0]}") from None
    if head is None:
        raise FindError(f"--photos {opts.photos}: no photos found (extensions: jpg, png, webp, heic, ...)")
    pairs = _pairs(source, opts.model)
    find_id = content_key("find", source.key(), collection.uri, pairs, opts.top_k, opts.borderline)
    out = (opts.out or f"{source.root}/{FINDS}/{find_id}").rstrip("/") or "/"
    out_st = _out_dir(out, endpoint)
    try:
        out_st.check_writable()
    except StorageError as exc:
        raise FindError(f"--out {out}: {exc}") from None
    cache_root = opts.cache or source.root
    if opts.cache:
        try:
            Storage(opts.cache, endpoint).check_writable()
        except (ValueError, StorageError) as exc:
            raise FindError(f"--cache {opts.cache}: {exc}") from None

    def paths() -> Iterator[str]:
        yield head
        yield from first

    return Prepared(source, collection, paths(), listing, pairs, out, out_st, cache_root)


def _model_label(model: str) -> str:
    return "pretrained" if model == "pretrained" else "personalised"


def run_find(opts: FindOptions, runner: Any = None, say: Say | None = None,
             prepared: Prepared | None = None) -> FindResult:
    say = say or (lambda _m: None)
    runner = runner or LocalRunner()
    t0 = time.perf_counter()
    prep = prepared or prepare_find(opts)
    source, collection, pairs, out = prep.source, prep.collection, prep.pairs, prep.out
    say(f"find: {len(source.targets)} instance(s) of run {source.run_id} "
        f"({', '.join(f'{t.instance}:{t.data_config}' for t in source.targets)}), "
        f"model {opts.model}, photos {collection.uri}, runner {runner.name}")

    t_ref = time.perf_counter()
    models = sorted({m for m, _ in pairs})
    references = runner.call(references_task, source, models, opts.share_trunk)
    t_ref = time.perf_counter() - t_ref

    plan = ScanPlan(source, collection, prep.cache_root, pairs, references, opts.batch_size, opts.share_trunk)
    paths, hashes, errors, score_rows, rival_rows = [], [], [], [], []
    embedded, workers = 0, set()
    t_scan = time.perf_counter()
    for table in runner.scan(plan, batches(prep.paths, opts.batch_size), say):
        d = table.to_pydict()
        paths += d["path"]
        hashes += d["content_hash"]
        errors += d["error"]
        score_rows += d["scores"]
        rival_rows += d["rivals"]
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
    rival_rows = [rival_rows[i] for i in order]
    ok = np.asarray([e is None for e in errors], dtype=bool)
    S = np.full((len(paths), len(pairs)), np.nan, dtype=np.float32)
    R = np.full_like(S, np.nan)
    for i, (row, riv) in enumerate(zip(score_rows, rival_rows)):
        if row is not None:
            S[i], R[i] = row, riv
    decisions = decide_pairs(S, R, pairs, guard=opts.guard)
    primary = [j for j, (m, _) in enumerate(pairs) if (opts.model == "pretrained") == (m == "pretrained")]
    t_exp = time.perf_counter()
    if opts.expand and ok.any():  # decide, add each object's best hits to its references, decide again
        rows = np.flatnonzero(ok)
        sets = {pairs[j][1]: expansion_sets(S[rows, j], decisions[j].tier[rows] != "", opts.expand)
                for j in primary}
        expand_scores(plan, [hashes[i] for i in rows], rows, S, R, sets)
        decisions = decide_pairs(S, R, pairs, guard=opts.guard)
        say(f"expansion: {sum(len(v) for v in sets.values())} hits joined their objects' reference photos "
            f"(at most {opts.expand} each); scored and decided again")
    t_exp = time.perf_counter() - t_exp
    for j in primary:
        if decisions[j].flag:
            say(f"WARNING {pairs[j][1]}: {decisions[j].flag}")

    # top hits (likely first) and near misses per instance (primary model), localised by the dense head
    picks: dict[int, dict[str, list[int]]] = {}
    for j in primary:
        dec = decisions[j]
        idx = np.flatnonzero(ok)
        order_j = idx[np.lexsort((-S[idx, j], dec.tier[idx] != "likely", dec.tier[idx] == ""))]
        top = [int(i) for i in order_j if dec.tier[i]][: opts.top_k]
        misses = [int(i) for i in idx[np.argsort(-S[idx, j], kind="stable")] if not dec.tier[i]]
        picks[j] = {"top": top, "borderline": misses[: opts.borderline]}
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
        dec = decisions[j]
        loc = located.get(j, {"reason": None, "hits": {}})
        top, border = set(picks[j]["top"]), set(picks[j]["borderline"])
        okj = np.flatnonzero(ok)
        rank = {int(i): r for r, i in enumerate(okj[np.argsort(-S[okj, j], kind="stable")])}
        for i in sorted(set(np.flatnonzero(dec.tier != "").tolist()) | top | border, key=lambda i: -S[i, j]):
            l = loc["hits"].get(paths[i], {})
            hit_rows.append({"path": paths[i], "instance": inst, "model": _model_label(model),
                             "tier": str(dec.tier[i]), "decision": bool(dec.tier[i]),
                             "score": float(S[i, j]), "rival": float(R[i, j]), "z": float(dec.z[i]),
                             "margin": float(dec.margin[i]), "rank": int(rank[i]),
                             "top": i in top, "borderline": i in border,
                             "box": l.get("box"), "mask_rle": l.get("mask_rle"),
                             "mask_size": l.get("mask_size"), "content_hash": hashes[i]})
        t = next(t for t in source.targets if t.instance == inst)
        per_instance[inst] = {"model": _model_label(model), "category": t.category,
                              "adapter_key": t.adapter_key, "data_config": t.data_config, "run_ap": t.run_ap,
                              "hits": dec.likely + dec.possible, **dec.summary(),
                              "reference_photos": list(source.dataset.instances[inst].train),
                              "localization": loc["reason"] or f"{len(loc['hits'])} photos localised"}
    hits = pa.Table.from_pylist(hit_rows, schema=HITS_SCHEMA)
    long: dict[str, list] = {k: [] for k in ("path", "content_hash", "model", "instance", "score", "rival",
                                             "z", "margin", "tier", "decision")}
    okp = [p for p, g in zip(paths, ok) if g]
    okh = [h for h, g in zip(hashes, ok) if g]
    for j, (model, inst) in enumerate(pairs):
        dec = decisions[j]
        long["path"] += okp
        long["content_hash"] += okh
        long["model"] += [_model_label(model)] * len(okp)
        long["instance"] += [inst] * len(okp)
        long["score"] += S[ok, j].tolist()
        long["rival"] += R[ok, j].tolist()
        long["z"] += dec.z[ok].tolist()
        long["margin"] += dec.margin[ok].tolist()
        long["tier"] += dec.tier[ok].tolist()
        long["decision"] += (dec.tier[ok] != "").tolist()
    scores = pa.table(long)
    unreadable = pa.table({"path": [p for p, e in zip(paths, errors) if e is not None],
                           "error": [e for e in errors if e is not None]})
    listing = prep.listing
    summary = {
        "find_id": out.rstrip("/").rsplit("/", 1)[-1], "out": out, "run": source.run_uri,
        "photos": collection.uri, "model": opts.model, "runner": runner.name, "workers": len(workers),
        "images_listed": listing.get("listed", len(paths)), "files_ignored": listing.get("ignored", 0),
        "images_scanned": int(ok.sum()), "unreadable": int((~ok).sum()),
        "unreadable_files": [{"path": p, "error": e} for p, e in zip(paths, errors) if e is not None][:200],
        "embeddings_computed": int(embedded),
        "embeddings_reused": int(ok.sum()) * len(models) - int(embedded),
        "throughput_images_per_s": round(len(paths) / max(t_scan, 1e-9), 2),
        "seconds": {"references": round(t_ref, 2), "scan": round(t_scan, 2), "localization": round(t_loc, 2),
                    "expansion": round(t_exp, 2), "total": round(time.perf_counter() - t0, 2)},
        "calibration": {"rule": RULE + (EXPAND_RULE.format(k=opts.expand) if opts.expand else ""),
                        "guard_share": opts.guard,
                        "reference_photos": int(len(next(iter(references.values()))[1])),
                        "likely_z": LIKELY_Z, "likely_margin": LIKELY_M, "agree_z": AGREE_Z,
                        "possible_z": POSSIBLE_Z, "expand": opts.expand},
        "instances": per_instance,
        "flagged": {inst: v["flag"] for inst, v in per_instance.items() if v["flag"]},
        "background": {f"{_model_label(m)}:{i}": decisions[j].background.median
                       for j, (m, i) in enumerate(pairs)},
        "driver_peak_rss_mb": round(driver_peak_mb(), 1), "cache_root": prep.cache_root,
    }
    from persrep.find.gallery import gallery_html, hits_csv

    page = gallery_html(source, collection, summary, hits).encode()
    _track(opts, source, summary, page, say)
    files = {"hits.parquet": _table_bytes(hits), "hits.csv": hits_csv(hits),
             "scores.parquet": _table_bytes(scores), "unreadable.parquet": _table_bytes(unreadable),
             "find.html": page, "summary.json": json.dumps(summary, indent=1, default=str).encode()}
    _publish(prep.out_storage, files, {"kind": "find", "run": source.run_uri, "photos": collection.uri})
    n_likely = sum(v["likely"] for v in per_instance.values())
    n_possible = sum(v["possible"] for v in per_instance.values())
    say(f"find: {n_likely} likely and {n_possible} possible hits; wrote {out}/find.html and {out}/hits.csv")
    return FindResult(out, summary, hits, scores)


def expand_scores(plan: ScanPlan, ok_hashes: list[str], rows: np.ndarray, S: np.ndarray, R: np.ndarray,
                  sets: dict[str, np.ndarray]) -> None:
    """Score the readable photos (``rows`` of ``S`` and ``R``, in place) again against references
    expanded by ``sets`` (object -> positions in ``rows`` of the photos that join its references;
    :mod:`persrep.find.expand`), one model at a time, from the embeddings the scan stored."""
    stores = plan.open_stores()  # opened after the scan: its index holds every shard the scan wrote
    for spec in plan.specs:
        found = stores[spec.name].lookup(ok_hashes)
        missing = [h for h in ok_hashes if h not in found]
        if missing:
            raise FindError(f"expansion: {len(missing)} photo embeddings of model {spec.name} are not in the "
                            f"cache {plan.cache_root} (was it changed during the scan?); run again")
        emb = np.stack([found[h] for h in ok_hashes])
        ref, owners = plan.references[spec.name]
        cols = [j for j, (m, _) in enumerate(plan.pairs) if m == spec.name]
        s, r = score_pairs({spec.name: emb}, {spec.name: expanded_references(emb, ref, owners, sets)},
                           [plan.pairs[j] for j in cols])
        S[np.ix_(rows, cols)], R[np.ix_(rows, cols)] = s, r


def _publish(st: Storage, files: dict[str, bytes], meta: dict[str, Any]) -> None:
    """The outputs, then ``MANIFEST.json`` last; a re-run first removes the previous manifest."""
    if st.exists(MANIFEST):
        st.fs.delete_file(st.path(MANIFEST))
    entries = {}
    for name, data in files.items():
        st.write_bytes(name, data)
        entries[name] = {"sha256": sha256_bytes(data), "size": len(data)}
    man = Manifest("finds", st.root.rstrip("/").rsplit("/", 1)[-1], entries, meta, time.time())
    st.write_bytes(MANIFEST, man.to_json())


HITS_SCHEMA = pa.schema([("path", pa.string()), ("instance", pa.string()), ("model", pa.string()),
                         ("tier", pa.string()), ("decision", pa.bool_()), ("score", pa.float32()),
                         ("rival", pa.float32()), ("z", pa.float32()), ("margin", pa.float32()),
                         ("rank", pa.int32()), ("top", pa.bool_()), ("borderline", pa.bool_()),
                         ("box", pa.list_(pa.int32())), ("mask_rle", pa.string()),
                         ("mask_size", pa.list_(pa.int32())), ("content_hash", pa.string())])


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
                         **{f"likely.{k}": v["likely"] for k, v in summary["instances"].items()}})
    with tempfile.TemporaryDirectory(prefix="persrep-find-") as tmp:
        (Path(tmp) / "find.html").write_bytes(page)
        (Path(tmp) / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        tracker.log_artifact(Path(tmp) / "find.html")
        tracker.log_artifact(Path(tmp) / "summary.json")
    tracker.end("FINISHED")
    summary["mlflow_run_id"] = run_id
