"""Benchmark of ``persrep find`` on the evaluation pool of a finished run -> bench/find.json.

The run's test images are a labelled photo collection (folder = instance): the honest "does it
find my object" figure is precision and recall of the yes/no decision at the calibrated
threshold, for the pretrained backbone and for the personalised one, per instance and mean.
The adapters are those of ONE data configuration (``--data-config``, default cut_paste), not the
best per instance: choosing by the run's AP on this very pool would leak it. AP over the same
scores is given for context. The calibration never sees the pool (see persrep/find/calibrate.py).

Throughput: the scan (listing, reading, decoding, embedding with every model, scoring) of the
same photos (a) in a plain single-process loop (no Ray, no cache; backbone loaded once, batches of
32, torch's default threads) and (b) by the Ray job (``persrep find`` in a subprocess, Ray Data
actor pool, fresh cache); ratio = Ray / loop images per second, model loading included on both
sides, cluster start-up excluded. Driver peak memory: the subprocess's ``ru_maxrss``, next to
the collection's size on disk (the driver must not hold it).

    python bench/find.py --run runs/local/runs/<run_id>      # after `make demo`
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _labelled_pool(run_dir: Path) -> Path:
    data = Path(json.loads((run_dir / "summary.json").read_text())["data"])
    return data / "test"


def quality(scores: pd.DataFrame) -> dict:
    from sklearn.metrics import average_precision_score, precision_score, recall_score

    scores = scores.assign(truth=scores["path"].str.split("/").str[0] == scores["instance"])
    per: dict = {}
    for (model, inst), g in scores.groupby(["model", "instance"]):
        y, d = g["truth"].to_numpy(), g["decision"].to_numpy()
        per.setdefault(model, {})[inst] = {
            "precision": float(precision_score(y, d, zero_division=0)),
            "recall": float(recall_score(y, d, zero_division=0)),
            "hits": int(d.sum()), "positives": int(y.sum()), "photos": int(len(y)),
            "threshold": float(g["threshold"].iloc[0]),
            "ap": float(average_precision_score(y, g["score"].to_numpy()))}
    mean = {m: {k: float(np.mean([v[k] for v in rows.values()])) for k in ("precision", "recall", "ap")}
            for m, rows in per.items()}
    return {"per_instance": per, "mean": mean}


def grown_collection(photos: Path, dest: Path, repeat: int) -> Path:
    """``repeat`` copies of the pool, each photo's first pixel nudged per copy: distinct bytes (no
    cache hit between copies), same content for the model. For throughput only."""
    from PIL import Image

    for k in range(repeat):
        for f in sorted(photos.rglob("*.png")):
            with Image.open(f) as im:
                im = im.convert("RGB")
            px = im.load()
            r, g, b = px[0, 0]
            px[0, 0] = ((r + k + 1) % 256, g, b)
            out = dest / f"copy{k}" / f.relative_to(photos)
            out.parent.mkdir(parents=True, exist_ok=True)
            im.save(out)
    return dest


def plain_loop(source, photos: Path, models: list[str], batch_size: int = 32) -> dict:
    """The baseline: one process, no Ray, no cache: read, decode, embed with every model, score."""
    import torch

    from persrep.find.collection import Collection, iter_paths, load_image
    from persrep.find.models import Extractors, ModelSpec

    t0 = time.perf_counter()
    keys = {t.instance: t.adapter_key for t in source.targets}
    ex = Extractors(source, [ModelSpec(m, None if m == "pretrained" else keys[m]) for m in models])
    coll = Collection(str(photos))
    paths = list(iter_paths(coll))
    n = 0
    for start in range(0, len(paths), batch_size):
        imgs = [load_image(coll, p) for p in paths[start:start + batch_size]]
        good = [i.image for i in imgs if i.image is not None]
        if good:
            ex.global_features(torch.stack([ex.transform(im) for im in good]), models)
        n += len(imgs)
    seconds = time.perf_counter() - t0
    return {"images": n, "seconds": round(seconds, 2), "images_per_s": round(n / seconds, 2),
            "torch_threads": torch.get_num_threads()}


def ray_job(run_dir: Path, photos: Path, data_config: str, work: Path, actors: int | None) -> dict:
    out = work / "finds" / "ray"
    cmd = [sys.executable, "-m", "persrep.cli", "find", "--run", str(run_dir), "--photos", str(photos),
           "--data-config", data_config, "--out", str(out), "--cache", str(work / "cache-ray"),
           "--no-tracking", "--top-k", "4"]
    if actors:
        cmd += ["--actors", str(actors)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"ray job failed ({proc.returncode}): {proc.stderr[-2000:]}")
    s = json.loads((out / "summary.json").read_text())
    return {"images": s["images_listed"], "scan_seconds": s["seconds"]["scan"],
            "images_per_s": s["throughput_images_per_s"], "workers": s["workers"],
            "job_seconds": round(time.perf_counter() - t0, 2), "driver_peak_rss_mb": s["driver_peak_rss_mb"],
            "seconds": s["seconds"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="<root>/runs/<run_id> of a finished run")
    p.add_argument("--data-config", default="cut_paste")
    p.add_argument("--actors", type=int, default=None)
    p.add_argument("--label", default="toy world demo run")
    p.add_argument("--repeat", type=int, default=8, help="throughput collection = this many distinct "
                   "copies of the pool (model start-up amortised)")
    p.add_argument("--skip-quality", action="store_true", help="throughput only (keeps the stored quality)")
    p.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    args = p.parse_args(argv)

    from persrep.find.job import FindOptions, run_find
    from persrep.find.source import resolve_run

    run_dir = Path(args.run).resolve()
    photos = _labelled_pool(run_dir)
    work = Path(tempfile.mkdtemp(prefix="persrep-bench-find-"))
    try:
        t0 = time.perf_counter()
        res = None if args.skip_quality else run_find(FindOptions(photos=str(photos), run=str(run_dir), data_config=args.data_config,
                                   model="both", out=str(work / "finds" / "quality"),
                                   cache=str(work / "cache-q"), tracking=False, top_k=4))
        q = quality(res.scores.to_pandas()) if res is not None else None
        q_seconds = time.perf_counter() - t0
        source = resolve_run(str(run_dir), data_config=args.data_config)
        models = [t.instance for t in source.targets]  # what the job embeds with (personalised)
        grown = grown_collection(photos, work / "grown", args.repeat) if args.repeat > 1 else photos
        loop = plain_loop(source, grown, models)
        ray = ray_job(run_dir, grown, args.data_config, work, args.actors)
        size_mb = sum(f.stat().st_size for f in grown.rglob("*") if f.is_file()) / 2**20
    finally:
        shutil.rmtree(work, ignore_errors=True)
    previous = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    old = previous.get(args.label, {})
    doc = {
        "what": "persrep find on the evaluation pool of a finished run (labelled by folder)",
        "command": f"python bench/find.py --run {args.run} --data-config {args.data_config} --repeat {args.repeat}",
        "run": args.label, "data_config": args.data_config, "instances": len(models),
        "photos": res.summary["images_scanned"] if res else old.get("photos"),
        "calibration": res.summary["calibration"] if res else old.get("calibration"),
        "quality": q if q else old.get("quality"),
        "quality_job_seconds": round(q_seconds, 1) if res else old.get("quality_job_seconds"),
        "throughput": {"plain_loop": loop, "ray_job": ray,
                       "ratio_ray_over_loop": round(ray["images_per_s"] / loop["images_per_s"], 3),
                       "collection": f"{args.repeat} distinct copies of the pool" if args.repeat > 1 else "the pool",
                       "models_per_image": len(models), "cpus": os.cpu_count(),
                       "load_average_at_end": os.getloadavg()[0]},
        "driver": {"peak_rss_mb": ray["driver_peak_rss_mb"], "collection_mb": round(size_mb, 1)},
    }
    previous[args.label] = doc
    Path(args.out).write_text(json.dumps(previous, indent=1) + "\n")
    print(f"{'model':<13} {'precision':>9} {'recall':>7} {'AP':>6}")
    for m, v in doc["quality"]["mean"].items():
        print(f"{m:<13} {v['precision']:>9.3f} {v['recall']:>7.3f} {v['ap']:>6.3f}")
    print(f"throughput: loop {loop['images_per_s']}/s, ray {ray['images_per_s']}/s "
          f"(ratio {doc['throughput']['ratio_ray_over_loop']}); driver peak {ray['driver_peak_rss_mb']} MB "
          f"for a {size_mb:.1f} MB collection -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
