"""Real phone photos without masks: pretrained vs personalised, today's main vs each lever -> bench/realphoto.json.

The data set is a folder of real photos in the reference layout with NO masks (by default
``../shared/data/grocery_produce``: 39 store-shot produce varieties, 3 train photos each). Every
variant is the product's own job (``ray_jobs/run_all.py``, local Ray) with the issue's command
line plus the variant's overrides; the figures are read back from the run's ``results.parquet``
and ``summary.json``, so what is measured is what a user gets.

- ``main``: the baseline, run from another source tree (``--baseline-tree``, a checkout of the
  main that this work started from) with that tree's command: ``--config offline-real
  generator.auto_masks=true 'generator.types=[cut_paste]'``.
- levers: this tree, each variant one override set on top of the shipped ``offline-real``
  defaults (``generator.types=[cut_paste]`` and the external negatives / backgrounds folders are
  given on the command line, as a user would). Lever variants share one storage root, so units
  that do not depend on the lever (masks, synthesis, the pretrained evaluation) are computed once.
- ``--final NAME``: the variant that is the new default, also run on its own storage root so its
  seconds per instance are a whole run's.

Per instance: classification AP and retrieval NDCG of the pretrained backbone and of the
personalised one (the ``cut_paste`` adapter); an instance whose adapter failed counts as its
pretrained score in the all-instance means (delta 0) and is listed. Top level: ``delta_ap`` /
``delta_ndcg`` of the final variant (mean over all instances, x100), share of instances improved,
worst drop, seconds per instance.

    python bench/realphoto.py --work /tmp/rp --baseline-tree /path/to/main_checkout
    python bench/realphoto.py --work /tmp/rp --subset 3 --variants base,recolour   # every 3rd instance
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PERSREP_SHARED_DATA", REPO.parent / "shared" / "data"))
HEADLINE = {"classification": "ap", "retrieval": "ndcg"}

# variant -> overrides on top of the shipped offline-real defaults (this tree)
# channels_last: ~1.7x faster CNN steps on CPU, not in unit keys (operational)
_L = ["personalization.max_steps=40", "personalization.channels_last=true"]
VARIANTS: dict[str, list[str]] = {
    # the levers off: today's main settings on this tree (robust masks are not a setting)
    "masks_only": _L,
    "recolour": [*_L, "personalization.hard_negatives.recolour=64"],
    "real_share": [*_L, "personalization.real_positive_share=0.5"],
    "crops": [*_L, "personalization.crop_scale=[0.35,1.0]"],
    # real positives: a larger share, and twice the steps with them
    "real_share75": [*_L, "personalization.real_positive_share=0.75"],
    "real_share_t15": [*_L, "personalization.real_positive_share=0.5", "personalization.temperature=0.15"],
    "real_share_rank4": [*_L, "personalization.real_positive_share=0.5", "personalization.lora.rank=4"],
    "real_share_rank4_t15": [*_L, "personalization.real_positive_share=0.5", "personalization.lora.rank=4",
                             "personalization.temperature=0.15"],
    "real_share_steps80": ["personalization.max_steps=80", "personalization.channels_last=true",
                           "personalization.real_positive_share=0.5"],
    "wise": [*_L, "evaluation.adapter_scale=0.5"],
    "steps80": ["personalization.max_steps=80", "personalization.channels_last=true"],
    # evaluate with the feature training optimises (pretrained rows change with it too)
    "eval_feature": [*_L, "evaluation.global_feature=cls+mean"],
    # the training levers together, then each left out (leave-one-out ablation), then inference levers on top
    "combo": [*_L, "personalization.hard_negatives.recolour=64", "personalization.real_positive_share=0.5",
              "personalization.crop_scale=[0.35,1.0]"],
    "combo_no_recolour": [*_L, "personalization.real_positive_share=0.5", "personalization.crop_scale=[0.35,1.0]"],
    "combo_no_real": [*_L, "personalization.hard_negatives.recolour=64", "personalization.crop_scale=[0.35,1.0]"],
    "combo_no_crops": [*_L, "personalization.hard_negatives.recolour=64", "personalization.real_positive_share=0.5"],
    "combo_wise": [*_L, "personalization.hard_negatives.recolour=64", "personalization.real_positive_share=0.5",
                   "personalization.crop_scale=[0.35,1.0]", "evaluation.adapter_scale=0.5"],
    "combo_feature": [*_L, "personalization.hard_negatives.recolour=64", "personalization.real_positive_share=0.5",
                      "personalization.crop_scale=[0.35,1.0]", "evaluation.global_feature=cls+mean"],
    # session 10, on top of the shipped default (64 steps, rank 4, share 0.25); run with
    # --levers-root final --subset 1 so they reuse the final run's masks and synthesis, all instances
    # train the feature that is evaluated: a CNN's average pool ('cls'), not concat(avg, max)
    "train_cls": ["personalization.feature=cls"],
    # not run on all 39 yet (on the 10-variety subset it sank one variety by -22 AP)
    "t15": ["personalization.temperature=0.15"],
    # session 12, on top of the shipped default (evaluation at 224 px); `--subset 3 --levers-root
    # levers12`, reference 'shipped' (no override)
    "shipped": [],
    # negatives: crops of the train photos beside the object, less those like the object (contrastive/hard_negatives.py)
    "context64": ["personalization.hard_negatives.context=64"],
    # LoRA on one more stage (blocks.4's pointwise convs too)
    "blocks4": ["personalization.lora.target_modules=[" + ",".join(
        f"blocks.{b}.{i}.{c}" for b, n in ((4, 3), (5, 4), (6, 1)) for i in range(n)
        for c in ("conv_pw", "conv_pwl")) + ",conv_head]"],
}


# inference-only variants run on the final run's adapters, all instances
FINAL_VARIANTS: dict[str, list[str]] = {
    "final_scale75": ["evaluation.adapter_scale=0.75"],
    "final_scale50": ["evaluation.adapter_scale=0.5"],
    # output-space blend with the pretrained features (persrep/models/blend.py)
    "final_share25": ["evaluation.pretrained_share=0.25"],
    "final_share50": ["evaluation.pretrained_share=0.5"],
    # the global tasks at the backbone's pretraining size (trained at 160): bench/tta_study.json
    "final_eval224": ["evaluation.global_input_size=224"],
}


def base_command(tree: Path, data: Path, root: Path, name: str) -> list[str]:
    return [sys.executable, str(tree / "ray_jobs" / "run_all.py"), "--config", "offline-real",
            "--data", str(data), "--storage", str(root), "--run-id", name, "generator.types=[cut_paste]",
            f"personalization.external_negatives={SHARED / 'dreambooth'}",
            f"generator.cut_paste.backgrounds={SHARED / 'backgrounds'}"]


def run_variant(name: str, tree: Path, root: Path, data: Path, overrides: list[str],
                instances: list[str] | None) -> dict:
    run_dir = root / "runs" / name
    cmd = [*base_command(tree, data, root, name), *overrides]
    if instances:
        cmd.append("data.instances=[" + ",".join(instances) + "]")
    t0 = time.time()
    if not (run_dir / "results.parquet").exists():
        env = {**os.environ, "PYTHONPATH": str(tree), "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
        root.mkdir(parents=True, exist_ok=True)
        log = root / f"{name}.log"
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd[2:])}", flush=True)
        with open(log, "w") as fh:
            rc = subprocess.call(cmd, cwd=tree, env=env, stdout=fh, stderr=subprocess.STDOUT)
        if rc not in (0, 1) or not (run_dir / "results.parquet").exists():
            raise SystemExit(f"{name}: the job exited {rc}; see {log}")
    wall = time.time() - t0
    return {"command": " ".join(cmd[2:]), "tree": str(tree), "run_dir": str(run_dir),
            **read_run(run_dir), "wall_s_this_call": round(wall, 1)}


def read_run(run_dir: Path) -> dict:
    df = pd.read_parquet(run_dir / "results.parquet")
    summary = json.loads((run_dir / "summary.json").read_text())
    df = df[df["task"].isin(list(HEADLINE)) & df["metric"].isin(list(HEADLINE.values()))]
    pre = df[df["model"] == "pretrained"]
    pers = df[(df["model"] == "personalised") & (df["data_config"] == "cut_paste")]
    names = sorted(pre["instance"].unique())
    per: dict[str, dict] = {}
    for inst in names:
        row: dict = {"adapter": bool((pers["instance"] == inst).any())}
        for task, metric in HEADLINE.items():
            p = pre[(pre["instance"] == inst) & (pre["task"] == task)]["value"]
            q = pers[(pers["instance"] == inst) & (pers["task"] == task)]["value"]
            row[f"pretrained_{metric}"] = round(float(p.iloc[0]) * 100, 2)
            row[f"personalised_{metric}"] = round(float(q.iloc[0]) * 100, 2) if len(q) else row[f"pretrained_{metric}"]
            row[f"delta_{metric}"] = round(row[f"personalised_{metric}"] - row[f"pretrained_{metric}"], 2)
        for col in ("model_used", "model_reason"):
            if col in pers.columns and (pers["instance"] == inst).any():
                row[col] = str(pers[pers["instance"] == inst][col].iloc[0])
        per[inst] = row
    costs = summary.get("costs", {})
    return {"instances": len(names), "failed": [n for n in names if not per[n]["adapter"]],
            "per_instance": per, "mean": means(per), "summary_costs": costs,
            "s_per_instance": seconds_per_instance(summary, len(names))}


def seconds_per_instance(summary: dict, n: int) -> float | None:
    wall = summary.get("timings", {}).get("total")  # the job's stages, start to end
    return round(float(wall) / n, 1) if wall and n else None


def means(per: dict[str, dict]) -> dict:
    rows = list(per.values())
    out: dict = {}
    for metric in HEADLINE.values():
        d = np.array([r[f"delta_{metric}"] for r in rows])
        out[f"pretrained_{metric}"] = round(float(np.mean([r[f"pretrained_{metric}"] for r in rows])), 2)
        out[f"personalised_{metric}"] = round(float(np.mean([r[f"personalised_{metric}"] for r in rows])), 2)
        out[f"delta_{metric}"] = round(float(d.mean()), 2)
        out[f"improved_{metric}"] = f"{int((d > 0).sum())}/{len(d)}"
        out[f"worst_{metric}"] = round(float(d.min()), 2)
    out["improved_both"] = f"{sum(r['delta_ap'] > 0 and r['delta_ndcg'] > 0 for r in rows)}/{len(rows)}"
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", required=True, help="scratch directory for the storage roots")
    ap.add_argument("--data", default=str(SHARED / "grocery_produce"))
    ap.add_argument("--baseline-tree", help="checkout of the main to compare with (variant 'main')")
    ap.add_argument("--baseline-run", help="a finished run of the baseline tree with the baseline command "
                    "(read instead of run again)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="lever variants to run (comma-separated)")
    ap.add_argument("--subset", type=int, default=1, help="levers on every n-th instance (sorted names)")
    ap.add_argument("--levers-root", default="levers", help="storage root (under --work) the lever variants share")
    ap.add_argument("--final", help="the variant that is the new default ('final', or one of --final-variants): "
                    "run on all instances, own root")
    ap.add_argument("--final-variants", default="", help="inference-only variants on the final run's adapters")
    ap.add_argument("--reuse-final", action="store_true", help="keep the final variant's entry of --out (its "
                    "whole-run timing) instead of re-running it; only --final-variants run")
    ap.add_argument("--final-overrides", default="", help="extra overrides of the final variant (space-separated)")
    ap.add_argument("--out", default=str(REPO / "bench" / "realphoto.json"))
    args = ap.parse_args()
    work, data = Path(args.work).resolve(), Path(args.data).resolve()
    names = sorted(p.name for p in (data / "train").iterdir() if p.is_dir())
    subset = names[::args.subset] if args.subset > 1 else None
    out_path = Path(args.out)
    result = json.loads(out_path.read_text()) if out_path.exists() else {}
    result.update({"data": str(data.name), "instances": len(names), "subset_rule": f"every {args.subset}-th of the sorted instance names",
                   "subset": subset or names, "cpus": os.cpu_count(),
                   "notes": ["s_per_instance = the job's total stage seconds / instances; meaningful for 'main' and "
                             "'final' (whole runs on their own roots); lever variants share a root (masks, synthesis, "
                             "pretrained evaluation reused), inference-only variants re-evaluate only",
                             "every figure x100; means over instances; an instance without adapter counts as pretrained",
                             "lever_deltas_vs_*: difference of the (personalised - pretrained) means, same instances"]})
    variants = result.setdefault("variants", {})
    if args.baseline_tree:
        tree = Path(args.baseline_tree).resolve()
        if args.baseline_run:  # the baseline's finished run (made by that tree with this command)
            run_dir = Path(args.baseline_run).resolve()
            cmd = base_command(tree, data, run_dir.parents[1], run_dir.name) + ["generator.auto_masks=true"]
            variants["main"] = {"command": " ".join(cmd[2:]), "tree": str(tree), "run_dir": str(run_dir),
                                **read_run(run_dir)}
        else:
            variants["main"] = run_variant("main", tree, work / "main", data, ["generator.auto_masks=true"], None)
        variants["main"]["commit"] = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
                                                    capture_output=True, text=True).stdout.strip()
        _save(out_path, result)
    for name in [v for v in args.variants.split(",") if v]:
        variants[name] = run_variant(name, REPO, work / args.levers_root, data, VARIANTS[name], subset)
        variants[name]["lever"] = VARIANTS[name]
        _save(out_path, result)
    if args.final:
        extra = args.final_overrides.split() if args.final_overrides else []
        if not (args.reuse_final and "final" in variants):  # else: its entry in --out as measured
            variants["final"] = run_variant("final", REPO, work / "final", data, extra, None)
            variants["final"]["overrides"] = extra
        # inference-only levers on all instances, on the final run's adapters (same storage root)
        for name in [v for v in args.final_variants.split(",") if v]:
            variants[name] = run_variant(name, REPO, work / "final", data, [*extra, *FINAL_VARIANTS[name]], None)
            variants[name]["lever"] = FINAL_VARIANTS[name]
            _save(out_path, result)
        fin = variants[args.final]["mean"]
        result["final"] = args.final
        result.update({"delta_ap": fin["delta_ap"], "delta_ndcg": fin["delta_ndcg"],
                       "improved_both": fin["improved_both"], "worst_ap": fin["worst_ap"],
                       "s_per_instance": variants["final"]["s_per_instance"]})
        for n, v in variants.items():
            if n in FINAL_VARIANTS or n == "final":
                result.setdefault("final_variants", {})[n] = v["mean"]
    # lever deltas on the subset: each lever vs 'masks_only' (its reference), same instances
    for ref_name in ("masks_only", "combo", "shipped"):
        ref = variants.get(ref_name)
        if ref:
            result[f"lever_deltas_vs_{ref_name}"] = {
                n: {m: round(v["mean"][f"delta_{m}"] - ref["mean"][f"delta_{m}"], 2) for m in HEADLINE.values()}
                for n, v in variants.items() if n in VARIANTS and n != ref_name and v["instances"] == ref["instances"]}
    _save(out_path, result)
    print(json.dumps({k: v for k, v in result.items() if k != "variants"}, indent=1))
    for n, v in variants.items():
        print(f"{n:12s} n={v['instances']:3d} failed={len(v['failed'])} {v['mean']} s/inst={v['s_per_instance']}")
    return 0


def _save(path: Path, result: dict) -> None:
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main())
