"""Benchmark of ``persrep find`` on a labelled photo collection -> bench/find.json.

The collection (default ``../shared/data/grocery_produce_find``, see its SOURCE.md) holds photos
of the run's instances and of other objects in nested folders; ``truth.csv`` (``path,instance``)
says which photo shows which instance and is read HERE ONLY, to score: the find job never sees
it (its calibration uses the run and the unlabelled photos, persrep/find/calibrate.py).

Per instance, for the pretrained backbone and for the personalised adapters of the same run, at
the tool's own decisions: precision, recall and F1 of the *likely* tier alone and of every hit
(*likely* + *possible*), the share of photos called a hit, ranking AP of the score, and the best
F1 any threshold on the score could reach when chosen with the truth (for reference only: a
user has no truth). Means over the run's instances and over every instance of
``instances.txt`` (an instance the run has no adapter for counts 0), each tier's pooled precision,
and the scan's photos/s (cold cache: every photo embedded with every model).

    python bench/find.py --run <root>/runs/<run_id> [--out bench/find.json] [--scratch DIR]
    python bench/find.py --run ... --scratch DIR --rescore     # decide again from DIR's scores,
                                                                 # no scan (try a variant cheaply)

``--scratch`` keeps the embedding cache and the find's outputs between runs (default: a fresh
temporary directory, removed at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_COLLECTION = REPO.parent / "shared" / "data" / "grocery_produce_find"


def _prf(y: np.ndarray, d: np.ndarray) -> dict:
    tp = int((y & d).sum())
    p = tp / int(d.sum()) if d.sum() else 0.0
    r = tp / int(y.sum()) if y.sum() else 0.0
    return {"precision": round(p, 4), "recall": round(r, 4),
            "f1": round(2 * p * r / (p + r), 4) if p + r else 0.0, "hits": int(d.sum()), "true_hits": tp}


def best_f1(y: np.ndarray, s: np.ndarray) -> float:
    """The best F1 of ``score >= t`` over every t (chosen WITH the truth: reference only)."""
    order = np.argsort(-s, kind="stable")
    tp = np.cumsum(y[order])
    k = np.arange(1, len(y) + 1)
    return float((2 * tp / (k + y.sum())).max()) if y.sum() else 0.0


def quality(scores: pd.DataFrame, truth: dict[str, str], all_instances: list[str]) -> dict:
    from sklearn.metrics import average_precision_score

    per: dict = {}
    for (model, inst), g in scores.groupby(["model", "instance"], sort=True):
        y = np.asarray([truth.get(p) == inst for p in g["path"]])
        tier = g["tier"].to_numpy()
        per.setdefault(model, {})[inst] = {
            "likely": _prf(y, tier == "likely"), "hits": _prf(y, tier != ""),
            "share_called_hit": round(float((tier != "").mean()), 4), "positives": int(y.sum()),
            "ap": round(float(average_precision_score(y, g["score"])), 4) if y.any() else None,
            "best_f1_with_truth": round(best_f1(y, g["score"].to_numpy()), 4)}
    mean: dict = {}
    for model, rows in per.items():
        m: dict = {"instances": len(rows)}
        for tier in ("likely", "hits"):
            for k in ("precision", "recall", "f1"):
                vals = [v[tier][k] for v in rows.values()]
                m[f"{tier}_{k}"] = round(float(np.mean(vals)), 4)
                m[f"{tier}_{k}_over_all_{len(all_instances)}"] = round(float(np.sum(vals)) / len(all_instances), 4)
            hits = sum(v[tier]["hits"] for v in rows.values())
            m[f"{tier}_pooled_precision"] = round(sum(v[tier]["true_hits"] for v in rows.values()) / max(1, hits), 4)
        possible_hits = sum(v["hits"]["hits"] - v["likely"]["hits"] for v in rows.values())
        possible_true = sum(v["hits"]["true_hits"] - v["likely"]["true_hits"] for v in rows.values())
        m["possible_only_pooled_precision"] = round(possible_true / max(1, possible_hits), 4)
        m["share_called_hit"] = round(float(np.mean([v["share_called_hit"] for v in rows.values()])), 4)
        m["ap"] = round(float(np.mean([v["ap"] for v in rows.values() if v["ap"] is not None])), 4)
        m["best_f1_with_truth"] = round(float(np.mean([v["best_f1_with_truth"] for v in rows.values()])), 4)
        mean[model] = m
    return {"per_instance": per, "mean": mean}


def rescore(scores: pd.DataFrame, **rule) -> pd.DataFrame:
    """The stored scores decided again by :func:`persrep.find.calibrate.decide_pairs` (no scan)."""
    from persrep.find.calibrate import decide_pairs

    keys = sorted({(m, i) for m, i in zip(scores["model"], scores["instance"])}, key=lambda k: k[0] != "pretrained")
    pairs = [("pretrained" if m == "pretrained" else i, i) for m, i in keys]
    wide = scores.pivot_table(index="path", columns=["model", "instance"], values=["score", "rival"])
    S = np.stack([wide[("score", m, i)].to_numpy() for m, i in keys], axis=1)
    R = np.stack([wide[("rival", m, i)].to_numpy() for m, i in keys], axis=1)
    decisions = decide_pairs(S, R, pairs, **rule)
    parts = [pd.DataFrame({"path": wide.index, "model": m, "instance": i, "score": S[:, j],
                           "tier": decisions[j].tier, "decision": decisions[j].tier != ""})
             for j, (m, i) in enumerate(keys)]
    return pd.concat(parts, ignore_index=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="<root>/runs/<run_id> of a finished run on the collection's instances")
    p.add_argument("--collection", default=str(DEFAULT_COLLECTION), help="dir with photos/, truth.csv, instances.txt")
    p.add_argument("--data-config", default=None, help="adapters of this data configuration (default: the "
                   "best per instance by the run's own AP, as `persrep find` does)")
    p.add_argument("--instances", default=None, help="comma-separated subset of the run's instances, or "
                   "'every:K' = every K-th of them in name order (a cheaper scan: one model per instance; "
                   "each instance's scores and rivals are the same as in a full scan)")
    p.add_argument("--scratch", default=None, help="keep the cache and the find's outputs here")
    p.add_argument("--rescore", action="store_true", help="decide again from --scratch's scores.parquet")
    p.add_argument("--expand", type=int, default=None, help="find's --expand (default: find's own default)")
    p.add_argument("--label", default=None, help="entry name in the JSON (default: the run id)")
    p.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    args = p.parse_args(argv)

    from persrep.find.job import FindOptions, run_find

    coll = Path(args.collection)
    truth = dict(pd.read_csv(coll / "truth.csv").itertuples(index=False, name=None))
    all_instances = [s for s in (coll / "instances.txt").read_text().strip().split(",") if s]
    scratch = Path(args.scratch) if args.scratch else Path(tempfile.mkdtemp(prefix="persrep-bench-find-"))
    find_dir = scratch / "find"
    label = args.label or Path(args.run).name
    instances = None
    if args.instances and args.instances.startswith("every:"):
        from persrep.find.source import resolve_run

        names = sorted(t.instance for t in resolve_run(args.run, data_config=args.data_config).targets)
        instances = names[::int(args.instances.split(":", 1)[1])]
    elif args.instances:
        instances = [s for s in args.instances.split(",") if s]
    previous = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    try:
        if args.rescore:
            scores = rescore(pd.read_parquet(find_dir / "scores.parquet"))
            summary = json.loads((find_dir / "summary.json").read_text())
            job_seconds = None
        else:
            t0 = time.perf_counter()
            res = run_find(FindOptions(photos=str(coll / "photos"), run=args.run, data_config=args.data_config,
                                       instances=instances,
                                       model="both", out=str(find_dir), cache=str(scratch / "cache"),
                                       tracking=False, top_k=6, borderline=3,
                                       **({} if args.expand is None else {"expand": args.expand})),
                           say=lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", file=sys.stderr, flush=True))
            job_seconds = round(time.perf_counter() - t0, 1)
            scores, summary = res.scores.to_pandas(), res.summary
    finally:
        if not args.scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    q = quality(scores, truth, all_instances)
    old = previous.get(label, {})
    cold = summary["embeddings_computed"] > 0
    doc = {
        "what": "persrep find on a labelled collection; truth.csv read by this scorer only",
        "command": f"python bench/find.py --run {args.run}" + (f" --data-config {args.data_config}" if args.data_config else "")
                   + (f" --instances {args.instances}" if args.instances else "")
                   + (f" --expand {args.expand}" if args.expand is not None else ""),
        "run": args.run, "collection": str(coll), "photos": summary["images_scanned"],
        "unreadable": summary["unreadable_files"], "instances_in_run": len(summary["instances"]),
        "instances_in_collection": len(all_instances),
        "rule": summary["calibration"], "flagged": summary.get("flagged", {}),
        "quality": q,
        "expand": summary["calibration"].get("expand", 0),
        "expansion_seconds": summary["seconds"].get("expansion"),
        "throughput": ({"photos_per_s": summary["throughput_images_per_s"], "scan_seconds": summary["seconds"]["scan"],
                        "models_per_photo": len(summary["instances"]) + 1,  # each adapter + pretrained
                        "embeddings_computed": summary["embeddings_computed"],
                        "embeddings_reused": summary["embeddings_reused"],
                        "job_seconds": job_seconds, "cpus": os.cpu_count(),
                        "load_average_at_end": round(os.getloadavg()[0], 2)}
                       if cold else old.get("throughput")),
    }
    previous[label] = doc
    Path(args.out).write_text(json.dumps(previous, indent=1) + "\n")
    print(f"{'model':<13} {'tier':<7} {'P':>6} {'R':>6} {'F1':>6}   AP   bestF1(truth)  share")
    for model, m in q["mean"].items():
        for tier in ("likely", "hits"):
            print(f"{model:<13} {tier:<7} {m[tier + '_precision']:>6.3f} {m[tier + '_recall']:>6.3f} "
                  f"{m[tier + '_f1']:>6.3f}  {m['ap']:.3f}  {m['best_f1_with_truth']:.3f}  {m['share_called_hit']:.3f}")
    print(f"-> {args.out} [{label}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
