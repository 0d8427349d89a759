"""Dry run of `--config paper` at the real architectures, with random weights, on this machine.

Builds the stand-ins once (persrep/models/standins.py: SD 1.5 as a diffusers directory with the
real CLIP tokenizer; timm ViT-B/14 DINOv2, ViT-B/16 CLIP, ViT-B/16 MAE in a hub cache), then runs
``ray_jobs/run_all.py --config paper`` through Ray with overrides that change only sizes and counts
(resolution, steps, images, triplets, instances), plus what this machine needs: CPU resources,
the toy world as data, the stand-ins as model sources. Settings that are not sizes or counts and
had to change are listed in the JSON with the reason (``changed_settings``).

    python bench/paper_dryrun.py                    # full DreamBooth (UNet + text encoder), ~16 GB peak
    python bench/paper_dryrun.py --variant lora     # LoRA DreamBooth: what CI's slow test runs
    python bench/paper_dryrun.py --scale ci --variant lora --out /tmp/x.json   # the slow test's sizes

Prints per stage: status, seconds, peak RSS (the job's whole process tree: driver, Ray workers),
and writes bench/paper_dryrun.json: every stage, every unit, row errors, and per adapter how many
synthetic positives it was trained on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from persrep.models.standins import build_standins, standin_env, standins_dir  # noqa: E402

FULL_MIN_AVAILABLE_GB = 18.0  # a full SD 1.5 DreamBooth unit peaks near 16 GB on CPU

# scale -> sizes and counts (the paper's values in comments)
SCALES = {
    # all three backbones; one instance (each evaluation unit costs ~1 min on 2 loaded cores)
    "bench": dict(instances=1, backbones=3, db_steps=2, db_res=64, class_images=2, positives=3, negatives=3,
                  steps=2, res=64, backgrounds=2, triplets=8, pz_batch=4, pz_steps=2, dense=448,
                  test_per_scene=1, dense_per_instance=1),
    # CI's slow test: the first backbone only (DINOv2 ViT-B/14), the smallest counts
    "ci": dict(instances=1, backbones=1, db_steps=1, db_res=64, class_images=1, positives=2, negatives=2,
               steps=1, res=64, backgrounds=1, triplets=4, pz_batch=2, pz_steps=1, dense=224,
               test_per_scene=1, dense_per_instance=1),
}

# settings that are not sizes or counts, and why they differ from persrep/configs/paper.yaml
CHANGED = {
    "generator.types": ("[real_only, cut_paste, masked_dreambooth]",
                        "the paper compares these three data configurations; paper.yaml lists only "
                        "masked_dreambooth, and cut-and-paste on generated backgrounds is a path to prove"),
    "synthesis.filter.scorer": ("embedding", "dreamsim is an optional extra whose weights are a download; "
                                "embedding is the offline scorer (real EfficientNet-Lite0 weights)"),
    "synthesis.filter.threshold": ("0.0", "the stand-in SD 1.5 has random weights, so its images are noise; "
                                   "cosine of non-negative pooled features is >= 0, so 0.0 keeps every attempt: "
                                   "the filter's code path (crop, score, keep) runs, its selectivity cannot be "
                                   "shown with random weights"),
}


def overrides(std: Path, storage: Path, scale: str, variant: str) -> list[str]:
    z = SCALES[scale]
    out = [
        f"storage.root={storage}", "data.path=toy", "data.toy.categories=1",
        f"data.toy.instances_per_category={z['instances']}", "data.toy.image_size=64",
        f"data.toy.test_per_scene={z['test_per_scene']}", f"data.toy.dense_per_instance={z['dense_per_instance']}",
        "data.toy.negatives_per_category=4", f"data.max_instances={z['instances']}",
        f"generator.base_model={std / 'sd15'}",
        f"generator.dreambooth.steps={z['db_steps']}",            # 400
        f"generator.dreambooth.resolution={z['db_res']}",         # 512
        f"generator.dreambooth.num_class_images={z['class_images']}",  # 200
        f"synthesis.num_positives={z['positives']}",               # 450
        f"synthesis.num_negatives_per_category={z['negatives']}",  # 450
        f"synthesis.inference_steps={z['steps']}",                 # 50
        f"synthesis.resolution={z['res']}",                        # 512
        f"synthesis.batch_size={z['positives']}",                  # 16
        f"generator.cut_paste.num_backgrounds={z['backgrounds']}",
        f"personalization.num_triplets={z['triplets']}",           # 4500
        f"personalization.num_positives={z['positives']}",         # 450
        f"personalization.batch_size={z['pz_batch']}",             # 16
        f"personalization.max_steps={z['pz_steps']}",              # 2 epochs
        f"evaluation.dense_input_size={z['dense']}",               # 896
        "resources.num_cpus=2", "resources.cpus_per_trial=2", "resources.cpus_per_actor=1.5",
        "resources.gpus_per_trial=0", "resources.max_retries=0",
    ]
    if z["backbones"] < 3:  # a count: the first of paper.yaml's backbones, unchanged
        from persrep.config import load_settings

        keep = load_settings("paper").personalization.backbones[:z["backbones"]]
        out.append("personalization.backbones=[" + ", ".join(
            f"{{name: {b.name}, weights: {b.weights}, image_size: {b.image_size}}}" for b in keep) + "]")
    if variant == "lora":
        out += ["generator.dreambooth.use_lora=true"]
    out += [f"{k}={v}" for k, (v, _why) in CHANGED.items()]
    return out


class TreeMonitor:
    """Samples the RSS of a process and all its descendants; peak per stage (from the job's lines)."""

    def __init__(self, pid: int, every: float = 0.5):
        self.root = psutil.Process(pid)
        self.every = every
        self.stage = "startup"
        self.peaks: dict[str, float] = {}
        self.peak_single: dict[str, float] = {}
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> tuple[float, float]:
        total, single = 0.0, 0.0
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return 0.0, 0.0
        for p in procs:
            try:
                rss = p.memory_info().rss / 2**30
            except psutil.Error:
                continue
            total += rss
            single = max(single, rss)
        return total, single

    def _run(self) -> None:
        while not self._stop.is_set():
            total, single = self._sample()
            self.peaks[self.stage] = max(self.peaks.get(self.stage, 0.0), total)
            self.peak_single[self.stage] = max(self.peak_single.get(self.stage, 0.0), single)
            time.sleep(self.every)

    def start(self) -> "TreeMonitor":
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.thread.join()


def wait_for_memory(min_gb: float, wait_s: float, say) -> tuple[bool, float]:
    t0 = time.time()
    while True:
        avail = psutil.virtual_memory().available / 2**30
        if avail >= min_gb:
            return True, avail
        if time.time() - t0 >= wait_s:
            return False, avail
        say(f"memory: {avail:.1f} GB available < {min_gb} GB for a full SD 1.5 DreamBooth unit; waiting")
        time.sleep(60)


def unit_metas(root: Path, stage: str) -> list[dict]:
    d = root / stage
    out = []
    for m in sorted(d.glob("*/MANIFEST.json")) if d.exists() else []:
        doc = json.loads(m.read_text())
        out.append({"key": m.parent.name, **doc.get("meta", {})})
    return out


def synthesis_rows(root: Path) -> dict[str, dict]:
    """Per synthesis unit: rows, kept rows, rows with an error."""
    import pyarrow.parquet as pq

    out = {}
    for meta in unit_metas(root, "synthesis"):
        rows = [r for p in sorted((root / "synthesis" / meta["key"]).glob("part-*.parquet"))
                for r in pq.read_table(p, columns=["kept", "error"]).to_pylist()]
        out[meta["key"]] = {"group": meta.get("group"), "generator": meta.get("generator"),
                            "instance": meta.get("instance"), "rows": len(rows),
                            "kept": sum(bool(r["kept"]) for r in rows),
                            "errors": sum(r["error"] is not None for r in rows)}
    return out


def run(args) -> dict:
    say = lambda m: print(m, flush=True)  # noqa: E731
    t_all = time.time()
    std_root = Path(args.standins).expanduser() if args.standins else None
    t0 = time.time()
    build_standins(std_root, say=say)
    std = standins_dir(std_root)
    build_s = time.time() - t0
    variant, fallback = args.variant, None
    if variant == "full":
        ok, avail = wait_for_memory(args.min_free_gb, args.wait_s, say)
        if not ok:
            fallback = f"only {avail:.1f} GB available after {args.wait_s:.0f} s: fell back to the LoRA variant"
            say(fallback)
            variant = "lora"
    storage = Path(args.storage).expanduser().absolute()
    if args.fresh and storage.exists():  # else a re-run skips every finished unit (and says so)
        import shutil

        shutil.rmtree(storage)
    ovr = overrides(std, storage, args.scale, variant)
    cmd = [sys.executable, str(REPO / "ray_jobs" / "run_all.py"), "--config", "paper", "--run-id", args.run_id, *ovr]
    env = {**os.environ, **standin_env(std_root), "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled",
           "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)  # always its own cluster
    say("running: ray_jobs/run_all.py --config paper ... (" + str(len(ovr)) + " overrides)")
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    mon = TreeMonitor(proc.pid).start()
    lines: list[str] = []
    stage_re = re.compile(r"^stage (\w+): \d+ units")
    for raw in proc.stdout:  # type: ignore[union-attr]
        line = re.sub(r"^\[\d\d:\d\d:\d\d\] ", "", raw.rstrip("\n"))  # the job's timestamps
        lines.append(line)
        m = stage_re.match(line.strip())
        if m:
            mon.stage = m.group(1)
        if args.verbose or line.startswith(("stage ", "FAILED", "RETRIED", "WARNING", "results:", "run_all:")):
            say("  | " + raw.rstrip())
    code = proc.wait()
    mon.stop()
    wall = time.time() - t0
    summary_path = storage / "runs" / args.run_id / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    stages = {}
    for name, counts in summary.get("stages", {}).items():
        n = sum(counts.get(k, 0) for k in ("done", "skipped", "failed"))
        status = "done" if counts.get("failed", 0) == 0 and n > 0 else ("failed" if counts.get("failed") else "empty")
        stages[name] = {"status": status, "units": n, **counts, "seconds": summary.get("timings", {}).get(name),
                        "peak_rss_tree_gb": round(mon.peaks.get(name, 0.0), 2),
                        "peak_rss_one_process_gb": round(mon.peak_single.get(name, 0.0), 2)}
    syn = synthesis_rows(storage)
    adapters = [{"instance": a.get("instance"), "data_config": a.get("data_config"), "backbone": a.get("backbone"),
                 "positives_source": a.get("metrics", {}).get("positives_source"),
                 "positives_trained_on": a.get("metrics", {}).get("num_positives"),
                 "negatives": a.get("metrics", {}).get("num_negatives"), "steps": a.get("metrics", {}).get("steps")}
                for a in unit_metas(storage, "adapters")]
    kept_by = {(u["generator"], u["instance"]): u["kept"] for u in syn.values() if u["group"].startswith("pos:")}
    for a in adapters:  # the positives an adapter trained on are the ones its data configuration names
        gen = (a["data_config"] or "").split("/")[0]
        a["synthetic_positives_available"] = 0 if gen == "real_only" else kept_by.get((gen, a["instance"]))
        a["as_named"] = (a["positives_source"] == "real") if gen == "real_only" else (
            a["positives_source"] == "synthetic" and a["positives_trained_on"] == a["synthetic_positives_available"]
            and (a["positives_trained_on"] or 0) > 0)
    doc = {
        "what": "`--config paper` end to end at the real architectures, random weights (bench/paper_dryrun.py)",
        "command": f"python bench/paper_dryrun.py --variant {args.variant} --scale {args.scale}" + (" --fresh" if args.fresh else ""),
        "machine": {"cpus": os.cpu_count(), "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
                    "platform": platform.platform(), "cuda": _cuda()},
        "variant": variant, "variant_fallback": fallback, "notes": args.note, "scale": args.scale, "sizes": SCALES[args.scale],
        "changed_settings": {k: {"value": v, "why": why} for k, (v, why) in CHANGED.items()},
        "overrides": [o.replace(str(std), "<standins>").replace(str(storage), "<storage>") for o in ovr],
        "standins": {"dir": str(std).replace(str(Path.home()), "~"), "build_seconds_this_run": round(build_s, 1)},
        "exit_code": code, "wall_seconds": round(wall, 1), "total_seconds": round(time.time() - t_all, 1),
        "peak_rss_tree_gb": round(max(mon.peaks.values(), default=0.0), 2),
        "stages": stages,
        "row_errors": sum(u["errors"] for u in syn.values()),
        "synthesis_units": sorted(syn.values(), key=lambda u: u["group"] or ""),
        "adapters": adapters,
        "every_stage_done": bool(stages) and all(s["status"] == "done" for s in stages.values()),
        "failures": summary.get("failures", []), "retries": summary.get("retries", []),
        "warnings": [n for n in summary.get("notes", []) if "WARNING" in n],
        "log_tail": lines[-25:] if code != 0 else [],
    }
    return doc


def _cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", choices=["full", "lora"], default="full")
    ap.add_argument("--scale", choices=sorted(SCALES), default="bench")
    ap.add_argument("--standins", default=None, help="stand-ins cache (default ~/.cache/persrep/standins)")
    ap.add_argument("--storage", default="/tmp/persrep-paper-dryrun")
    ap.add_argument("--run-id", default="dryrun")
    ap.add_argument("--out", default=str(REPO / "bench" / "paper_dryrun.json"))
    ap.add_argument("--min-free-gb", type=float, default=FULL_MIN_AVAILABLE_GB)
    ap.add_argument("--wait-s", type=float, default=600)
    ap.add_argument("--fresh", action="store_true", help="delete --storage first (recompute every unit)")
    ap.add_argument("--note", action="append", default=[], help="a line recorded in the JSON (e.g. why this variant)")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    doc = run(args)
    print(f"\n{'stage':16s} {'status':8s} {'units':>5s} {'seconds':>8s} {'peak RSS tree GB':>17s}")
    for name, s in doc["stages"].items():
        print(f"{name:16s} {s['status']:8s} {s['units']:5d} {s['seconds'] or 0:8.1f} {s['peak_rss_tree_gb']:17.2f}")
    for a in doc["adapters"]:
        print(f"adapter {a['instance']} {a['data_config']} {a['backbone']}: {a['positives_trained_on']} "
              f"{a['positives_source']} positives ({'as named' if a['as_named'] else 'NOT as named'})")
    print(f"row errors: {doc['row_errors']}; exit code {doc['exit_code']}; {doc['wall_seconds']} s")
    Path(args.out).write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print(f"wrote {args.out}")
    ok = doc["exit_code"] == 0 and doc["every_stage_done"] and doc["row_errors"] == 0 and \
        all(a["as_named"] for a in doc["adapters"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
