"""Identical results before and after a refactor: unit keys and result rows of a tiny run that
touches every stage, and of a two-trial sweep -> bench/equivalence/<label>.json.

The run (in-process, the toy world at 64 px with its train masks removed): all four generator
types (real_only, cut_paste, dreambooth, masked_dreambooth), the embedding filter (offline EfficientNet-Lite0), automatic masks
(GrabCut), template + LLM captions (the tests' tiny word-chain Llama), two CFGs. The sweep: the
shipped toy space cut to two trials (real_only and cut_paste data, one LoRA rank) on local Ray.

Recorded: every unit of ``units.json`` as (stage, label, key, status), the results rows (every
column but timings), the summary's stage counts, and for the sweep its trials (params, objective)
and result rows. Two files compare with ``--compare A B`` (exit 1 and the first differences when
they differ). Result values are compared exactly: the runs are single-threaded and seeded.

    python bench/equivalence.py --label before          # on the tree before the change
    python bench/equivalence.py --label after --compare bench/equivalence/before.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
OUT = REPO / "bench" / "equivalence"

RUN = ["data.toy.categories=2", "data.toy.instances_per_category=2", "data.toy.image_size=64",
       "data.toy.test_per_scene=1", "data.toy.negatives_per_category=4", "data.toy.dense_per_instance=1",
       "generator.types=[real_only, cut_paste, dreambooth, masked_dreambooth]",
       "generator.auto_masks=true", "segmentation.init=box",
       "generator.dreambooth.steps=2", "generator.dreambooth.num_class_images=2",
       "synthesis.num_positives=3", "synthesis.num_negatives_per_category=3", "synthesis.inference_steps=2",
       "synthesis.resolution=32", "synthesis.cfg=[3.0, 5.0]", "synthesis.caption_sources=[template, llm]",
       "synthesis.captions.per_category=2", "synthesis.captions.batch_size=4", "synthesis.captions.max_rounds=3",
       "synthesis.filter.enabled=true", "synthesis.filter.scorer=embedding", "synthesis.filter.threshold=0.2", "synthesis.filter.max_attempts_per_image=2",
       "generator.cut_paste.backgrounds=@data/backgrounds",
       "personalization.max_steps=3", "personalization.batch_size=4", "personalization.negatives=generated",
       "personalization.backbones=[{name: tf_efficientnet_lite0, weights: offline, image_size: 64}]",
       "evaluation.dense_input_size=64", "tracking.enabled=false"]
TIMING = ("seconds", "wall", "peak_rss", "time", "duration", "_s", "started", "ended", "date", "path", "uri", "dir")


def _plain(v):
    if isinstance(v, float):
        return repr(v)
    if hasattr(v, "item"):
        return _plain(v.item())
    return v if isinstance(v, (int, str, bool, type(None))) else str(v)


def _rows(frame) -> list[dict]:
    cols = sorted(c for c in frame.columns if not any(t in c.lower() for t in TIMING) and c not in ("run_id", "trial_id"))
    rows = [{c: _plain(r[c]) for c in cols} for r in frame.to_dict("records")]
    return sorted(rows, key=lambda r: json.dumps(r, sort_keys=True, default=str))


def maskless_toy(where: Path) -> Path:
    from persrep.data.toy import write_toy_dataset

    root = where / "plain"
    write_toy_dataset(root, categories=2, instances_per_category=2, image_size=64, test_per_scene=1,
                      dense_per_instance=1, negatives_per_category=4)
    shutil.rmtree(root / "train_masks")
    if not (root / "backgrounds").exists():
        shutil.copytree(next(p for p in (root / "negatives").iterdir() if p.is_dir()), root / "backgrounds")
    return root


def run_once(work: Path) -> dict:
    import pandas as pd

    from persrep.config import load_settings
    from persrep.pipeline import run_pipeline
    from tiny_lm import CHAIN, WORDS, chain_lm

    data = maskless_toy(work)
    model = chain_lm(work / "chain", WORDS, CHAIN)
    root = work / "root"
    s = load_settings("local", [*RUN, f"data.path={data}", f"storage.root={root}", f"synthesis.captions.model={model}"])
    summary = run_pipeline(s, run_id="eq")
    run_dir = root / "runs" / "eq"
    units = json.loads((run_dir / "units.json").read_text())
    return {"exit_code": summary.exit_code, "stages": summary.stages,
            "failures": sorted(f["unit"] for f in summary.failures),
            "units": sorted(([u["stage"], u["label"], u["key"], u["status"]] for u in units), key=str),
            "results": _rows(pd.read_parquet(run_dir / "results.parquet"))}


def run_sweep(work: Path) -> dict:
    import importlib.util

    import pandas as pd
    import yaml

    doc = yaml.safe_load((REPO / "tune_spaces" / "toy.yaml").read_text())
    doc["space"]["personalization.lora.rank"] = {"grid": [2]}  # 2 trials: real_only, cut_paste
    space = work / "toy.yaml"
    space.write_text(yaml.safe_dump(doc, sort_keys=False))
    spec = importlib.util.spec_from_file_location("persrep_sweep_job_eq", REPO / "ray_jobs" / "sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    root = work / "sweep"
    rc = mod.main(["--space", str(space), "--storage", str(root), "--name", "eq",
                   "resources.gpus_per_trial=0", "resources.cpus_per_trial=1", "tracking.enabled=false"])
    out = root / "sweeps" / "toy-eq"
    trials = pd.read_csv(out / "trials.csv")
    keep = [c for c in trials.columns if c not in ("trial", "status") and not any(t in c.lower() for t in TIMING)]
    units = {stage: sorted(p.parent.name for p in (root / stage).glob("*/MANIFEST.json"))
             for stage in ("masks", "captions", "base_images", "generators", "synthesis", "adapters", "evaluations")
             if (root / stage).is_dir()}
    return {"exit_code": rc, "trials": _rows(trials[keep]), "published": units,
            "results": _rows(pd.read_parquet(out / "results.parquet").drop(columns=["trial"], errors="ignore"))}


def compare(a: dict, b: dict, where: str = "") -> list[str]:
    diffs: list[str] = []
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k in ("label", "commit"):
                continue
            if k not in a or k not in b:
                diffs.append(f"{where}/{k}: only in {'after' if k in b else 'before'}")
            else:
                diffs += compare(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            diffs.append(f"{where}: {len(a)} vs {len(b)} entries")
        for i, (x, y) in enumerate(zip(a, b)):
            diffs += compare(x, y, f"{where}[{i}]")
    elif a != b:
        diffs.append(f"{where}: {a!r} != {b!r}")
    return diffs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--label", required=True)
    ap.add_argument("--compare", help="an earlier file: exit 1 when this run differs from it")
    ap.add_argument("--skip-sweep", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import subprocess

    import torch

    torch.set_num_threads(1)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="persrep-eq-") as tmp:
        doc = {"label": args.label, "commit": commit, "run": run_once(Path(tmp))}
        if not args.skip_sweep:
            doc["sweep"] = run_sweep(Path(tmp))
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{args.label}.json"
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    r = doc["run"]
    print(f"{path}: run exit {r['exit_code']}, {len(r['units'])} units, {len(r['results'])} result rows, "
          f"stages {r['stages']}" + (f"; sweep exit {doc['sweep']['exit_code']}, {len(doc['sweep']['trials'])} trials"
                                     if "sweep" in doc else ""))
    if args.compare:
        diffs = compare(json.loads(Path(args.compare).read_text()), doc)
        if diffs:
            print(f"DIFFERENT from {args.compare}: {len(diffs)} differences, first:\n  " + "\n  ".join(diffs[:20]))
            return 1
        print(f"identical to {args.compare}: unit keys, statuses and result rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
