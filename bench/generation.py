"""Generation benchmark: synthesis throughput through our code vs a plain diffusers loop,
DreamBooth step time, peak memory; SD 1.5 on GPU when one (and the weights) are present.

    python bench/generation.py [--rows 64] [--repeats 3] [--out bench/generation.json]

Each measurement runs in a fresh subprocess (so its peak RSS is its own) and the two synthesis
paths alternate, repeated, on the same rows: the ratio ours/plain comes from one run of this
script, because these machines are noisy. It measures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _settings(extra: list[str] = ()):
    from persrep.config import load_settings

    return load_settings("local", ["generator.base_model=tiny", *extra])


def _rows(settings, n: int):
    """The pipeline planner's negative rows for one category (prompts, seeds, cfg as a run makes them)."""
    from persrep.generation.plan import build_rows

    s = settings.model_copy(deep=True)
    s.synthesis.num_negatives_per_category = n
    groups = build_rows(s, {"mug_1": "mug"})
    return [r for g, rows in groups.items() if g.startswith("neg:") for r in rows][:n]


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synth_ours(n_rows: int, q) -> None:
    """Our path: BaseModelSampler (grouped, per-row seeds) + PNG records + atomic shard publish."""
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    from persrep.generation.base import Sampler
    from persrep.generation.dreambooth import BaseModelSampler
    from persrep.generation.shards import publish_unit, record
    from persrep.storage import Storage

    s = _settings()
    rows = _rows(s, n_rows)
    sampler = BaseModelSampler(Sampler.of(s))
    sampler.sample(rows[:1])  # load + warm up outside the timed region (same for both paths)
    t0 = time.perf_counter()
    recs = []
    for i in range(0, len(rows), s.synthesis.batch_size):
        batch = rows[i:i + s.synthesis.batch_size]
        recs += [record(x, r, "bench") for x, r in zip(sampler.sample(batch), batch)]
    with tempfile.TemporaryDirectory() as tmp:
        publish_unit(Storage(tmp), "bench", recs, s.synthesis.rows_per_shard, {})
    q.put({"seconds": time.perf_counter() - t0, "images": len(recs), "peak_rss_mb": _peak_mb()})


def synth_plain(n_rows: int, q) -> None:
    """Baseline: a plain diffusers pipeline loop over the same rows and batches (no encoding)."""
    import torch
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    from persrep.models.diffusion import make_scheduler, tiny_components

    s = _settings()
    rows = _rows(s, n_rows)
    c = tiny_components()
    pipe = StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer,
                                   unet=c.unet, scheduler=make_scheduler(c, s.synthesis.scheduler),
                                   safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)  # as ours: no per-step terminal output
    syn = s.synthesis
    pipe(prompt=[rows[0].prompt], num_inference_steps=syn.inference_steps, height=syn.resolution,
         width=syn.resolution, guidance_scale=rows[0].cfg)  # warm-up
    t0 = time.perf_counter()
    n = 0
    with torch.no_grad():
        for i in range(0, len(rows), syn.batch_size):
            batch = rows[i:i + syn.batch_size]
            out = pipe(prompt=[r.prompt for r in batch], num_inference_steps=syn.inference_steps,
                       height=syn.resolution, width=syn.resolution, guidance_scale=batch[0].cfg,
                       generator=[torch.Generator("cpu").manual_seed(r.seed) for r in batch])
            n += len(out.images)
    q.put({"seconds": time.perf_counter() - t0, "images": n, "peak_rss_mb": _peak_mb()})


def dreambooth_steps(mode: str, steps: int, q) -> None:
    import torch
    from PIL import Image

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    from persrep.generation.dreambooth import train_dreambooth
    from persrep.models.diffusion import load_components

    s = _settings([f"generator.dreambooth.use_lora={mode == 'lora'}", f"generator.dreambooth.steps={steps}",
                   "generator.dreambooth.train_text_encoder=false"])
    imgs = [Image.new("RGB", (64, 64), (40 * i, 100, 160)) for i in range(3)]
    cls = [Image.new("RGB", (64, 64), (200, 10 * i, 10)) for i in range(2)]
    t0 = time.perf_counter()
    res = train_dreambooth(load_components("tiny"), imgs, "mug", s.generator.dreambooth, class_images=cls)
    q.put({"seconds": time.perf_counter() - t0, "seconds_per_step": res.seconds_per_step,
           "steps": steps, "peak_rss_mb": _peak_mb()})


def _in_subprocess(fn, *args) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=fn, args=(*args, q))
    p.start()
    out = q.get(timeout=1800)
    p.join()
    return out


def gpu_section() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device on this machine: run on a GPU node for SD 1.5 figures "
                           "(512 px, 50 steps, fp16, batch 1-32; DreamBooth 400 steps)"}
    from persrep.models.diffusion import load_components, make_pipeline, generate_images

    base = os.environ.get("PERSREP_SD15", "runwayml/stable-diffusion-v1-5")
    try:
        comps = load_components(base, "cuda", torch.float16)
    except Exception as exc:  # noqa: BLE001 - weights not present: say so, measure nothing
        return {"skipped": f"SD 1.5 not available: {exc}"}
    pipe = make_pipeline(comps, "pndm")
    out = {"model": base, "gpu": torch.cuda.get_device_name(0), "images_per_s": {}}
    for bs in (1, 2, 4, 8, 16, 32):
        generate_images(pipe, ["a photo of a mug"] * bs, list(range(bs)), 5.0, 50, 512)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        generate_images(pipe, ["a photo of a mug"] * bs, list(range(bs)), 5.0, 50, 512)
        torch.cuda.synchronize()
        out["images_per_s"][bs] = bs / (time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--db-steps", type=int, default=20)
    ap.add_argument("--out", default=str(HERE / "generation.json"))
    args = ap.parse_args(argv)

    ours, plain = [], []
    for _ in range(args.repeats):  # alternate, so drift in machine load hits both paths alike
        ours.append(_in_subprocess(synth_ours, args.rows))
        plain.append(_in_subprocess(synth_plain, args.rows))
    ips = lambda r: r["images"] / r["seconds"]  # noqa: E731
    ours_ips = statistics.median(ips(r) for r in ours)
    plain_ips = statistics.median(ips(r) for r in plain)
    db = {m: _in_subprocess(dreambooth_steps, m, args.db_steps) for m in ("lora", "full")}
    result = {
        "benchmark": "generation", "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
                    "threads_per_process": int(os.environ.get("BENCH_THREADS", "1"))},
        "settings": {"rows": args.rows, "repeats": args.repeats, "model": "tiny (random, from config)",
                     "resolution": _settings().synthesis.resolution,
                     "inference_steps": _settings().synthesis.inference_steps,
                     "batch_size": _settings().synthesis.batch_size},
        "synthesis": {"ours_images_per_s": ours_ips, "plain_images_per_s": plain_ips,
                      "ratio_ours_over_plain": ours_ips / plain_ips,
                      "ours_runs": ours, "plain_runs": plain,
                      "ours_peak_rss_mb": max(r["peak_rss_mb"] for r in ours),
                      "plain_peak_rss_mb": max(r["peak_rss_mb"] for r in plain)},
        "dreambooth": db,
        "gpu": gpu_section(),
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{'measure':44s} {'value':>12s}")
    print(f"{'synthesis, ours (images/s)':44s} {ours_ips:12.2f}")
    print(f"{'synthesis, plain diffusers loop (images/s)':44s} {plain_ips:12.2f}")
    print(f"{'ratio ours / plain':44s} {ours_ips / plain_ips:12.3f}")
    print(f"{'peak RSS ours / plain (MB)':44s} {result['synthesis']['ours_peak_rss_mb']:6.0f} / "
          f"{result['synthesis']['plain_peak_rss_mb']:.0f}")
    for m, r in db.items():
        print(f"{'DreamBooth ' + m + ' (s/step)':44s} {r['seconds_per_step']:12.3f}   peak {r['peak_rss_mb']:.0f} MB")
    print(f"{'GPU':44s} {json.dumps(result['gpu'])[:70]}")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
