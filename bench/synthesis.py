#!/usr/bin/env python
"""Synthesis throughput: the Ray Data stage vs a plain single-process loop over the same rows.

All phases draw the same rows (4 personalised tiny DreamBooth generators x 600 positives = 2400
rows, tiny diffusion at 32 px, 4 steps, batch 8; why this size: ``WORKLOAD`` below) into the same storage root; ``synthesis/`` is
cleared in between. Measured in one run, on one machine, in this order:

A. the plain single-process loop (what ``LocalExecutor`` runs: ``run_synthesis_unit`` per unit)
   with 1 torch thread, the thread count of each actor;
B. the Ray Data stage (``run_synthesis_stage``) on a local Ray cluster of ``--num-cpus`` CPUs
   (cluster started before timing; actor start-up, generator loads and publishing are timed);
C. the same loop with torch's default threads (all cores).

Reported: wall time and rows/s of each, the ratio Ray / best single process (and vs A and C),
the Ray stage's time to its first output (cold start) and steady-state rate, generator loads vs
(actors x distinct generators) and vs batches, Ray object-store peak (raylet store stats, polled)
and driver RSS peak (psutil, polled) per phase, and how many images equal the Ray stage's
bit for bit (A must be all of them: same thread count; C may differ by a rounding step).

    .venv/bin/python bench/synthesis.py            # ~4 min on 2 free cores; writes bench/synthesis.json
    .venv/bin/python bench/synthesis.py synthesis.num_positives=150   # fewer rows (cold start weighs more)
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OVERRIDES = ["data.toy.categories=2", "data.toy.instances_per_category=2", "data.toy.image_size=64",
             "data.toy.test_per_scene=2", "data.toy.negatives_per_category=6",
             "generator.types=[dreambooth]", "generator.dreambooth.steps=2",
             "generator.dreambooth.num_class_images=2",
             "synthesis.num_positives=600", "synthesis.inference_steps=4", "synthesis.resolution=32",
             "synthesis.batch_size=8", "synthesis.rows_per_shard=32"]

WORKLOAD = ("2400 rows = 4 generators x 600 rows, ~55 s of steady sampling for the Ray stage on 2 quiet "
            "cores (each phase 60-90 s). A stage's cold start (actor processes, imports, first generator "
            "load: ~8 s to the first output here) is paid once per stage and actor, the generator load "
            "once per (actor, generator). At paper scale a synthesis stage is 100 instances x ~450 rows "
            "of 50-step SD 1.5: hours of GPU time, and per generator ~10 min of sampling per 5-10 s "
            "load (about 1:100), against ~10-30 s of cold start, so a bench dominated by cold start "
            "measures start-up, not the stage. The previous size, 150 rows per generator (600 rows), "
            "took 21.7 s for the whole Ray pass on the quiet machine, 7.9 s of it cold start (ratio "
            "0.76 against the 2-thread loop, /tmp run of 2026-12-05); 600 rows per generator brings the "
            "per-generator load : sampling ratio to ~1:10, still ten times more load-heavy than the "
            "paper's, while the bench stays ~4 min.")


class Sampler(threading.Thread):
    """Polls driver RSS and the Ray object store every ``period`` seconds; keeps the peaks."""

    def __init__(self, ray_state: bool, period: float = 0.2):
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process()
        self.ray_state = ray_state
        self.period = period
        self.stop_flag = threading.Event()
        self.rss_start = self.proc.memory_info().rss
        self.rss_peak = self.rss_start
        self.store_peak = 0
        self.store_capacity = 0
        self.store_error = None

    def _store(self) -> None:
        from ray._private import state
        from ray._private.internal_api import get_memory_info_reply

        reply = get_memory_info_reply(state.state, timeout_seconds=5)
        used = reply.store_stats.object_store_bytes_used
        self.store_peak = max(self.store_peak, used)
        self.store_capacity = max(self.store_capacity, reply.store_stats.object_store_bytes_avail)

    def run(self) -> None:
        while not self.stop_flag.is_set():
            self.rss_peak = max(self.rss_peak, self.proc.memory_info().rss)
            if self.ray_state and self.store_error is None:
                try:
                    self._store()
                except Exception as exc:  # noqa: BLE001 - reported, not fatal
                    self.store_error = f"{type(exc).__name__}: {exc}"[:200]
            self.stop_flag.wait(self.period)

    def finish(self) -> dict[str, Any]:
        self.stop_flag.set()
        self.join()
        mib = 1024 * 1024
        out = {"driver_rss_start_mib": round(self.rss_start / mib, 1),
               "driver_rss_peak_mib": round(self.rss_peak / mib, 1),
               "driver_rss_growth_mib": round((self.rss_peak - self.rss_start) / mib, 1)}
        if self.ray_state:
            out["object_store_peak_mib"] = round(self.store_peak / mib, 2)
            out["object_store_capacity_mib"] = round(self.store_capacity / mib, 1)
            if self.store_error:
                out["object_store_error"] = self.store_error
        return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="extra key=value settings overrides")
    ap.add_argument("--work", default="/tmp/persrep-bench-synthesis", help="storage root (kept: generators are reused)")
    ap.add_argument("--out", default=str(REPO / "bench" / "synthesis.json"))
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2, help="CPUs of the local Ray cluster")
    args = ap.parse_args()

    import numpy as np
    import ray
    import torch
    from PIL import Image

    from persrep.config import load_settings
    from persrep.distributed.synthesis import SynthesisStage
    from persrep.generation.shards import read_unit
    from persrep.pipeline.context import prepare_run
    from persrep.pipeline.stages.base_images import plan_shared_units, run_shared_unit
    from persrep.pipeline.stages.generator_prep import plan_generator_units, run_generator_unit
    from persrep.pipeline.stages.synthesis import plan_synthesis_units, run_synthesis_unit

    overrides = [*OVERRIDES, *args.overrides, f"storage.root={args.work}"]
    settings = load_settings("local", overrides)
    log = lambda m: print(m, flush=True)
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    ctx = prepare_run(settings, None, run_id="bench")
    for su in plan_shared_units(ctx.settings, ctx.instances):  # class images DreamBooth reads
        run_shared_unit(ctx, su)
    gen_units = plan_generator_units(ctx)  # the pipeline's own planners
    for u in gen_units:
        run_generator_unit(ctx, u)
    ready = {(u.generator, u.instance): u.key for u in gen_units}
    units = [u for u in plan_synthesis_units(ctx, ready) if not u.group.is_negatives]
    n_rows = sum(len(u.rows) for u in units)
    log(f"setup {time.perf_counter() - t0:.1f} s: {len(units)} units, {n_rows} rows, "
        f"{len({(u.generator, u.generator_key, u.instance) for u in units})} distinct generators")

    def clear() -> None:
        ctx.storage.delete_dir("synthesis")

    def rows_of() -> dict[str, list[dict]]:
        return {u.key: read_unit(ctx.storage, u.key, kept_only=False).to_pylist() for u in units}

    def loop(threads: int) -> tuple[float, dict[str, Any], dict[str, list[dict]]]:
        """The plain single-process loop (LocalExecutor's work) at ``threads`` torch threads."""
        clear()
        default = torch.get_num_threads()
        torch.set_num_threads(threads)
        mon = Sampler(ray_state=False)
        mon.start()
        t = time.perf_counter()
        try:
            for u in units:
                run_synthesis_unit(ctx, u)
        finally:
            torch.set_num_threads(default)
        seconds = time.perf_counter() - t
        mem = mon.finish()
        log(f"single process, {threads} torch thread(s): {seconds:.1f} s ({n_rows / seconds:.2f} rows/s)")
        return seconds, mem, rows_of()

    default_threads = torch.get_num_threads()
    # A: one thread (= each actor's), B: the Ray Data stage, C: torch's default threads (all cores)
    one_s, one_mem, one_rows = loop(1)

    clear()
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        mon = Sampler(ray_state=True)
        mon.start()
        t = time.perf_counter()
        outs = SynthesisStage(ctx, log, max_retries=1).run(units)
        ray_s = time.perf_counter() - t
        ray_mem = mon.finish()
        stats = outs.stats
    finally:
        ray.shutdown()
    assert all(o.status == "done" for o in outs), [(o.label, o.error) for o in outs]
    ray_rows = rows_of()
    log(f"ray data stage: {ray_s:.1f} s ({n_rows / ray_s:.2f} rows/s), first output after "
        f"{stats.get('first_output_s')} s")

    all_s, all_mem, all_rows = loop(default_threads)

    # -- compare --------------------------------------------------------------------------------
    def identical(ref: dict[str, list[dict]]) -> tuple[int, int, int]:
        same = diff = max_abs = 0
        for key, rows in ref.items():
            other = {r["index"]: r for r in ray_rows[key]}
            assert sorted(other) == sorted(r["index"] for r in rows), "row sets differ"
            for r in rows:
                if r["image"] == other[r["index"]]["image"]:
                    same += 1
                    continue
                diff += 1
                a = np.asarray(Image.open(io.BytesIO(r["image"])), dtype=np.int16)
                b = np.asarray(Image.open(io.BytesIO(other[r["index"]]["image"])), dtype=np.int16)
                max_abs = max(max_abs, int(np.abs(a - b).max()))
        return same, diff, max_abs

    same1, diff1, max1 = identical(one_rows)
    sameN, diffN, maxN = identical(all_rows)
    best_s = min(one_s, all_s)
    distinct = len({(u.generator, u.generator_key, u.instance) for u in units})
    first = stats.get("first_output_s") or 0.0
    figures = {
        "rows": n_rows, "units": len(units), "distinct_generators": distinct,
        "single_process_1_thread_s": round(one_s, 2),
        f"single_process_{default_threads}_threads_s": round(all_s, 2),
        "ray_stage_s": round(ray_s, 2),
        "rows_per_s": {"single_1_thread": round(n_rows / one_s, 3),
                       f"single_{default_threads}_threads": round(n_rows / all_s, 3),
                       "ray_stage": round(n_rows / ray_s, 3)},
        "throughput_ratio_ray_over_best_single": round(best_s / ray_s, 3),
        "throughput_ratio_ray_over_single_1_thread": round(one_s / ray_s, 3),
        f"throughput_ratio_ray_over_single_{default_threads}_threads": round(all_s / ray_s, 3),
        "ray_first_output_s": first,
        "ray_cold_start": stats.get("cold_start", {}),
        "ray_steady_rows_per_s": round(n_rows / max(ray_s - first, 1e-9), 3),
        "ray_actors": stats["actors"], "ray_batches": stats["batches"], "generator_loads": stats["loads"],
        "loads_bound_actors_x_generators": stats["actors"] * distinct,
        "per_instance": stats["per_instance"],
        "images_bit_identical_vs_1_thread": [same1, same1 + diff1], "max_abs_pixel_diff_vs_1_thread": max1,
        f"images_bit_identical_vs_{default_threads}_threads": [sameN, sameN + diffN],
        f"max_abs_pixel_diff_vs_{default_threads}_threads": maxN,
        "single_process_1_thread_memory": one_mem, f"single_process_{default_threads}_threads_memory": all_mem,
        "ray_stage_memory": ray_mem,
    }
    load_end = os.getloadavg()
    doc = {"benchmark": "synthesis: Ray Data stage vs single-process loop", "workload": WORKLOAD,
           "timestamp": dt.datetime.now().isoformat(timespec="seconds"),
           "settings": {"config": "local", "overrides": overrides,
                        "cpus_per_actor": settings.resources.cpus_per_actor, "ray_num_cpus": args.num_cpus,
                        "single_process_torch_threads": [1, default_threads], "actor_torch_threads": 1},
           "figures": figures,
           "machine": {"platform": platform.platform(), "python": platform.python_version(),
                       "cpus": os.cpu_count(), "torch": torch.__version__, "ray": ray.__version__,
                       "loadavg_start": [round(x, 2) for x in load_start],
                       "loadavg_end": [round(x, 2) for x in load_end]}}
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    table = [("rows", n_rows, n_rows, n_rows),
             ("wall s", f"{one_s:.1f}", f"{all_s:.1f}", f"{ray_s:.1f} (first out {first:.1f})"),
             ("rows/s", f"{n_rows / one_s:.2f}", f"{n_rows / all_s:.2f}", f"{n_rows / ray_s:.2f}"),
             ("workers", "1 proc x 1 thread", f"1 proc x {default_threads} threads",
              f"{stats['actors']} actors x 1 thread"),
             ("generator loads", len(units), len(units),
              f"{stats['loads']} (<= {stats['actors'] * distinct}; {stats['batches']} batches)"),
             ("images = Ray's", f"{same1}/{same1 + diff1}", f"{sameN}/{sameN + diffN}", "-"),
             ("driver RSS peak MiB", one_mem["driver_rss_peak_mib"], all_mem["driver_rss_peak_mib"],
              ray_mem["driver_rss_peak_mib"]),
             ("driver RSS growth MiB", one_mem["driver_rss_growth_mib"], all_mem["driver_rss_growth_mib"],
              ray_mem["driver_rss_growth_mib"]),
             ("object store peak MiB", "-", "-", ray_mem.get("object_store_peak_mib", "n/a"))]
    print()
    print(f"{'':22s} {'single, 1 thread':>18s} {f'single, {default_threads} threads':>18s} {'Ray Data stage':>30s}")
    for name, a, b, c in table:
        print(f"{name:22s} {a!s:>18s} {b!s:>18s} {c!s:>30s}")
    print(f"\nthroughput ratio Ray / best single process: {best_s / ray_s:.3f} "
          f"(vs 1 thread {one_s / ray_s:.3f}, vs {default_threads} threads {all_s / ray_s:.3f}); "
          f"load avg {load_start[0]:.1f} -> {load_end[0]:.1f}")
    cold = stats.get("cold_start") or {}
    if cold:
        print("cold start (s after the pass began, per actor): " + "; ".join(
            f"{k} {v}" for k, v in cold.items() if k != "actors"))
    print(f"wrote {args.out}")
    if os.environ.get("PERSREP_BENCH_KEEP") != "1":
        shutil.rmtree(Path(args.work) / "synthesis", ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
