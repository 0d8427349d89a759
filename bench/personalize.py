#!/usr/bin/env python
"""Personalisation throughput: the Ray Tune stage vs a plain in-process loop on the same data.

Toy world (2 categories x 2 instances, real-only positives, external negatives), the real offline
EfficientNet-Lite0 at 96 px, batch 12 (36 images per step), ``max_steps`` steps per unit,
checkpoint every 10 steps. Measured in one run, on one machine, in this order:

1. plain loop (A): ``train_one_instance`` in this process on unit 0's data, ``--threads`` torch
   threads (default 1);
2. Tune, K=1: unit 0 as one trial with ``cpus_per_trial`` = ``--threads`` (Ray sets the trial's
   OMP_NUM_THREADS from it, so torch runs the same number of threads; a cold trial actor: its
   start-up and imports are inside the stage's wall time, not inside the training loop);
3. Tune, K=2: units 1 and 2 as two concurrent trials, same ``cpus_per_trial`` each;
4. plain loop (B): as (1) again (the machine's load drifts; the ratio uses the mean of A and B).

Same thread count on both sides on purpose: on a shared 2-core machine under load, torch with 2
intra-op threads was measured 3-4x *slower* than with 1 (bench/personalize.json of the first run:
0.27-0.40 steps/s with 2 threads vs ~1.0 with 1), which would swamp what is measured here.

Figures: training-loop steps/s (``steps_per_s`` of the loop, per-step ``tune.report`` and
checkpoint surfacing included for the trials) and its ratio Tune/plain (target >= 0.9);
end-to-end wall per stage call; aggregate steps/s of K=2 vs K=1; peak RSS of each trial's actor
(``ru_maxrss``, reported by the trial) and of this driver process.

    .venv/bin/python bench/personalize.py                 # ~3-4 min on 2 cores; writes bench/personalize.json
    .venv/bin/python bench/personalize.py --steps 80      # longer loops
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OVERRIDES = ["data.toy.categories=2", "data.toy.instances_per_category=2", "data.toy.image_size=96",
             "data.toy.test_per_scene=2", "data.toy.negatives_per_category=12",
             "generator.types=[real_only]",
             "personalization.backbones=[{name: tf_efficientnet_lite0, weights: offline, image_size: 96}]",
             "personalization.batch_size=12", "personalization.checkpoint_every=10"]


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _units(ctx) -> list[Any]:
    from persrep.generation.plan import data_configs
    from persrep.pipeline.stages.personalization import PersonalizeUnit

    units = []
    for cfg in data_configs(ctx.settings):
        for name in sorted(ctx.instances):
            for bs in ctx.settings.personalization.backbones:
                units.append(PersonalizeUnit(name, ctx.instances[name], cfg, bs, None, []).keyed(ctx))
    return units


def plain_loop(ctx, unit, work: Path, threads: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    from persrep.contrastive.train import train_one_instance
    from persrep.distributed.data_parallel import training_data

    t0 = time.perf_counter()
    data = training_data(ctx, unit)
    res = train_one_instance(ctx.settings.personalization, unit.backbone, data, work)
    wall = time.perf_counter() - t0
    shutil.rmtree(work, ignore_errors=True)
    return {"steps": res.steps, "loop_seconds": round(res.seconds, 2), "wall_seconds": round(wall, 2),
            "steps_per_s": round(res.steps / res.seconds, 3), "torch_threads": torch.get_num_threads()}


def tune_run(ctx, units, cpus_per_trial: float) -> dict[str, Any]:
    from persrep.distributed.tune_stage import PersonalizationStage

    ctx.settings.resources.cpus_per_trial = cpus_per_trial
    t0 = time.perf_counter()
    outs = PersonalizationStage(ctx, None, 0, max_concurrent_trials=len(units)).run(units)
    wall = time.perf_counter() - t0
    bad = [(o.label, o.error) for o in outs if o.status != "done"]
    if bad:
        raise RuntimeError(f"Tune stage failed: {bad}")
    trials = [{"unit": o.label, "steps_per_s": round(o.value["steps_per_s"], 3),
               "loop_seconds": round(o.value["seconds"], 2), "peak_rss_mb": o.value.get("peak_rss_mb"),
               "torch_threads": o.value.get("torch_threads")} for o in outs]
    steps = ctx.settings.personalization.max_steps * len(units)
    return {"k": len(units), "cpus_per_trial": cpus_per_trial, "wall_seconds": round(wall, 2),
            "steps": steps, "end_to_end_steps_per_s": round(steps / wall, 3),
            "aggregate_loop_steps_per_s": round(sum(t["steps_per_s"] for t in trials), 3),
            "trials": trials}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--steps", type=int, default=40, help="optimiser steps per unit")
    ap.add_argument("--threads", type=int, default=1, help="torch threads = CPUs per trial")
    ap.add_argument("--out", default=str(REPO / "bench" / "personalize.json"))
    ap.add_argument("overrides", nargs="*", help="extra key=value settings overrides")
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    import ray
    import torch

    from persrep.config import load_settings, settings_to_dict
    from persrep.pipeline.context import prepare_run

    cores = os.cpu_count() or 1
    overrides = [*OVERRIDES, f"personalization.max_steps={args.steps}", *args.overrides]
    root = Path(tempfile.mkdtemp(prefix="persrep-bench-pz-"))
    load_before = _load()
    try:
        settings = load_settings("local", [*overrides, f"storage.root={root}"])
        ctx = prepare_run(settings, run_id="bench")
        units = _units(ctx)
        ray.init(address="local", num_cpus=cores, num_gpus=0, include_dashboard=False,
                 log_to_driver=False)
        print(f"ray up; {len(units)} units, {args.steps} steps each, {cores} cores, load {_load()}", flush=True)

        plain_a = plain_loop(ctx, units[0], root / "plain-a", args.threads)
        print(f"plain A: {plain_a}", flush=True)
        k1 = tune_run(ctx, units[:1], float(args.threads))
        print(f"tune K=1: {k1}", flush=True)
        k2 = tune_run(ctx, units[1:3], float(args.threads))
        print(f"tune K=2: {k2}", flush=True)
        plain_b = plain_loop(ctx, units[0], root / "plain-b", args.threads)
        print(f"plain B: {plain_b}", flush=True)
        ray.shutdown()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    plain = (plain_a["steps_per_s"] + plain_b["steps_per_s"]) / 2
    tune1 = k1["trials"][0]["steps_per_s"]
    figures = {
        "plain_steps_per_s": round(plain, 3),
        "tune_k1_loop_steps_per_s": tune1,
        "ratio_tune_over_plain": round(tune1 / plain, 3),
        # the load of a shared machine drifts: the ratio against each plain run, A (just before
        # the Tune runs) and B (just after), brackets the truth better than the mean alone
        "ratio_tune_over_plain_a": round(tune1 / plain_a["steps_per_s"], 3),
        "ratio_tune_over_plain_b": round(tune1 / plain_b["steps_per_s"], 3),
        "ratio_target": 0.9,
        "tune_k1_wall_seconds": k1["wall_seconds"],
        "tune_k1_fixed_overhead_seconds": round(k1["wall_seconds"] - k1["trials"][0]["loop_seconds"], 2),
        "plain_wall_seconds": round((plain_a["wall_seconds"] + plain_b["wall_seconds"]) / 2, 2),
        "k2_over_k1_aggregate_loop_throughput": round(k2["aggregate_loop_steps_per_s"] / tune1, 3),
        "k2_over_k1_end_to_end_throughput": round(k2["end_to_end_steps_per_s"] / k1["end_to_end_steps_per_s"], 3),
        "peak_rss_mb_per_trial": max(t["peak_rss_mb"] or 0 for t in k1["trials"] + k2["trials"]),
        "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    doc = {"benchmark": "personalize", "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "settings": {"overrides": overrides, "threads_per_path": args.threads,
                        "personalization": settings_to_dict(settings.personalization)},
           "machine": {"platform": platform.platform(), "python": platform.python_version(),
                       "cores": cores, "torch": torch.__version__, "ray": ray.__version__,
                       "cuda": torch.cuda.is_available(), "load_before": load_before, "load_after": _load()},
           "figures": figures,
           "runs": {"plain_a": plain_a, "tune_k1": k1, "tune_k2": k2, "plain_b": plain_b}}
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")

    rows = [("plain loop (A, B)", f"{plain_a['steps_per_s']:.2f}, {plain_b['steps_per_s']:.2f}",
             f"{plain_a['wall_seconds']:.1f}, {plain_b['wall_seconds']:.1f}", "-"),
            ("Tune K=1", f"{tune1:.2f}", f"{k1['wall_seconds']:.1f}", f"{k1['trials'][0]['peak_rss_mb']}"),
            ("Tune K=2 (sum of trials)", f"{k2['aggregate_loop_steps_per_s']:.2f}", f"{k2['wall_seconds']:.1f}",
             ", ".join(str(t["peak_rss_mb"]) for t in k2["trials"]))]
    print(f"\n{'path':28s} {'loop steps/s':>14s} {'wall s':>12s} {'trial peak RSS MB':>20s}")
    for r in rows:
        print(f"{r[0]:28s} {r[1]:>14s} {r[2]:>12s} {r[3]:>20s}")
    print(f"\nTune/plain loop steps/s: {figures['ratio_tune_over_plain']:.3f} vs the mean of A and B "
          f"({figures['ratio_tune_over_plain_a']:.3f} vs A, {figures['ratio_tune_over_plain_b']:.3f} vs B; "
          "target >= 0.9)")
    print(f"K=2 / K=1 throughput: loop {figures['k2_over_k1_aggregate_loop_throughput']:.3f}, "
          f"end-to-end {figures['k2_over_k1_end_to_end_throughput']:.3f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
