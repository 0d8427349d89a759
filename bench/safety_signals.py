"""Which per-instance check predicts that an adapter hurts? (analysis for the safety net, #26)

Reads a finished run (its adapters, predicted masks, results.parquet), embeds the evaluation pool
with the pretrained backbone once and with each adapter, and per instance computes
- the run's own figures (pretrained / personalised AP and NDCG, read back and re-computed here),
- inference variants on the same embeddings (score-level ensembles of pretrained and adapted),
- candidate check signals that use only what a user has: the 3 train photos, their predicted
  masks, and images outside the evaluation pool (crops of the photos' own surroundings; an
  external folder).

    python bench/safety_signals.py --storage /tmp/rp/final --run final --out /tmp/signals.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PERSREP_SHARED_DATA", REPO.parent / "shared" / "data"))


def l2(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)


def embed(extractor, tf, images: list[Image.Image]) -> np.ndarray:
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), 32):
            x = torch.stack([tf(im) for im in images[i:i + 32]])
            out.append(extractor.global_features(x).float().numpy())
    return l2(np.concatenate(out))


def normalised(g):
    from dataclasses import replace
    return replace(g, test_embeddings=l2(np.asarray(g.test_embeddings, np.float64)),
                   train_embeddings=l2(np.asarray(g.train_embeddings, np.float64)))


def surround_crops(img: Image.Image, mask: np.ndarray, n_min: float = 0.2) -> list[Image.Image]:
    """Crops of the photo outside the mask's box: the strips left/right/above/below it that are
    at least ``n_min`` of the photo's side."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return []
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    sx, sy = img.width / w, img.height / h
    boxes = [(0, 0, x0, h), (x1, 0, w, h), (0, 0, w, y0), (0, y1, w, h)]
    out = []
    for a, b, c, d in boxes:
        if (c - a) >= n_min * w and (d - b) >= n_min * h:
            out.append(img.crop((int(a * sx), int(b * sy), int(c * sx), int(d * sy))))
    return out


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    return float(np.mean([(p > neg).mean() + 0.5 * (p == neg).mean() for p in pos]))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--storage", required=True)
    ap.add_argument("--run", default="final")
    ap.add_argument("--config", default="offline-real")
    ap.add_argument("--data", default=str(SHARED / "grocery_produce"))
    ap.add_argument("--external", default=str(SHARED / "coil100_subset"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--summarise", action="store_true", help="only recompute the summary of --out's rows")
    args = ap.parse_args()
    if args.summarise:
        data = json.loads(Path(args.out).read_text())
        data["summary"] = summarise(data["rows"] if "rows" in data else data)
        Path(args.out).write_text(json.dumps(data, indent=1, default=float) + "\n")
        print(json.dumps(data["summary"], indent=1))
        return 0

    from persrep.config import load_settings
    from persrep.data.layout import open_dataset
    from persrep.evaluation.classification import instance_scores
    from persrep.evaluation.features import WithGlobalFeature
    from persrep.evaluation.metrics import average_precision
    from persrep.evaluation.retrieval import per_query_metrics
    from persrep.evaluation.stage import Evaluator
    from persrep.models.backbones import build_backbone, eval_transform
    from persrep.models.lora import load_adapter

    storage = Path(args.storage)
    settings = load_settings(args.config)
    bs = settings.personalization.backbones[0]
    ev_settings = settings.evaluation
    ds = open_dataset(args.data)
    ev = Evaluator(ds, ev_settings)
    p = ev.pools
    tf = eval_transform(bs)
    res = pd.read_parquet(storage / "runs" / args.run / "results.parquet")
    res = res[res["scene"] == "all"] if "scene" in res else res
    pers = res[(res["model"] == "personalised")]
    adapter_of = dict(zip(pers["instance"], pers["adapter_key"]))
    masks_of = {}
    for man in (storage / "masks").glob("*/MANIFEST.json"):
        meta = json.loads(man.read_text())["meta"]
        masks_of[meta["instance"]] = (man.parent, meta.get("confidence"))

    ext_files = sorted(f for f in Path(args.external).rglob("*") if f.suffix.lower() in (".png", ".jpg", ".jpeg"))
    ext_imgs = [Image.open(f).convert("RGB") for f in ext_files]

    pre_bb = build_backbone(bs).eval()
    pre_ex = WithGlobalFeature(pre_bb, ev_settings.global_feature)
    gP = normalised(ev._global_pool(pre_ex, "pre", bs))
    extP = embed(pre_ex, tf, ext_imgs)
    rows = {}
    for name in sorted(adapter_of):
        i = p.names.index(name)
        key = adapter_of[name]
        adir = storage / "adapters" / key
        meta = json.loads((adir / "MANIFEST.json").read_text())["meta"]
        backbone = load_adapter(build_backbone(bs), adir / "adapter.safetensors").eval()
        ex = WithGlobalFeature(backbone, ev_settings.global_feature)
        gA = normalised(ev._global_pool(ex, f"ad-{key}", bs))
        ev.cache.forget(f"ad-{key}")
        train_idx = np.nonzero(p.train_labels == i)[0]
        anchors = [ds.read_image(p.train[j]) for j in train_idx]
        mdir, conf = masks_of.get(name, (None, None))
        crops = []
        if mdir is not None:
            for k, im in enumerate(anchors):
                m = np.asarray(Image.open(mdir / f"{k}.png").convert("L")) > 0
                crops += surround_crops(im, m)
        extA = embed(ex, tf, ext_imgs)
        row = {"mask_confidence": conf, "n_crops": len(crops)}
        for tag, g, ext_e, ex_ in (("P", gP, extP, pre_ex), ("A", gA, extA, ex)):
            tr = g.train_embeddings[train_idx]
            cls = average_precision(g.test_labels == i, instance_scores(g.test_embeddings, tr))
            q = g.test_embeddings[g.test_labels == i]
            nd = float(np.nanmean(per_query_metrics(q, g.train_embeddings, g.train_labels, i)["ndcg"]))
            row[f"ap_{tag}"], row[f"ndcg_{tag}"] = round(cls * 100, 2), round(nd * 100, 2)
            sim = tr @ tr.T
            loo = np.array([max(sim[a, b] for b in range(len(tr)) if b != a) for a in range(len(tr))])
            row[f"tight_{tag}"] = float(sim[np.triu_indices(len(tr), 1)].mean())
            ext_s = (ext_e @ tr.T).max(1)
            row[f"ext_auc_{tag}"] = auc(loo, ext_s)
            row[f"ext_gap_{tag}"] = float(loo.mean() - np.sort(ext_s)[-10:].mean())
            if crops:
                ce = embed(ex_, tf, crops)
                cs = (ce @ tr.T).max(1)
                row[f"bg_gap_{tag}"] = float(loo.mean() - cs.mean())
                row[f"bg_auc_{tag}"] = auc(loo, cs)
            # the other instances' train photos: NOT usable by a check (in the pool), diagnostic only
            others = g.train_embeddings[g.train_labels != i]
            row[f"diag_sib_gap_{tag}"] = float(loo.mean() - np.sort((others @ tr.T).max(1))[-10:].mean())
        row["move"] = float(np.mean(np.sum(gP.train_embeddings[train_idx] * gA.train_embeddings[train_idx], 1)))
        # score-level ensembles of pretrained and adapted similarity
        for w in (0.25, 0.5, 0.75):
            sP = gP.test_embeddings @ gP.train_embeddings[train_idx].T
            sA = gA.test_embeddings @ gA.train_embeddings[train_idx].T
            s = (w * sA + (1 - w) * sP).max(1)
            row[f"ens{int(w*100)}_ap"] = round(average_precision(gP.test_labels == i, s) * 100, 2)
            qP, qA = gP.test_embeddings[gP.test_labels == i], gA.test_embeddings[gA.test_labels == i]
            # retrieval with the concatenated (weighted) features: cos = w*cosA + (1-w)*cosP
            fq = np.concatenate([np.sqrt(w) * qA, np.sqrt(1 - w) * qP], 1)
            fg = np.concatenate([np.sqrt(w) * gA.train_embeddings, np.sqrt(1 - w) * gP.train_embeddings], 1)
            row[f"ens{int(w*100)}_ndcg"] = round(float(np.nanmean(
                per_query_metrics(fq, fg, gP.train_labels, i)["ndcg"])) * 100, 2)
        m = meta.get("metrics", {})
        row.update({"final_loss": m.get("final_loss"), "final_acc": m.get("final_triplet_accuracy")})
        r = res[(res["instance"] == name) & (res["metric"].isin(["ap", "ndcg"]))]
        for model in ("pretrained", "personalised"):
            for task, metric in (("classification", "ap"), ("retrieval", "ndcg")):
                v = r[(r["model"] == model) & (r["task"] == task) & (r["metric"] == metric)]["value"]
                row[f"run_{model}_{metric}"] = round(float(v.iloc[0]) * 100, 2) if len(v) else None
        rows[name] = row
        print(name, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        Path(args.out).write_text(json.dumps({"rows": rows}, indent=1, default=float))
    out = {"what": __doc__.split("\n")[0], "run": str(storage / "runs" / args.run), "config": args.config,
           "external": args.external, "summary": summarise(rows), "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1, default=float) + "\n")
    print(json.dumps(out["summary"], indent=1))
    return 0


# candidate checks: (name, how it is computed from a row); low value = "the adapter may hurt"
SIGNALS = {
    "pretrained_tightness": lambda r: r["tight_P"],
    "tightness_gain": lambda r: r["tight_A"] - r["tight_P"],
    "external_gap_pretrained": lambda r: r["ext_gap_P"],
    "external_gap_gain": lambda r: r["ext_gap_A"] - r["ext_gap_P"],
    "surroundings_gap_gain": lambda r: r.get("bg_gap_A", np.nan) - r.get("bg_gap_P", np.nan),
    "feature_move": lambda r: -r["move"],
    "final_loss": lambda r: -(r["final_loss"] if r["final_loss"] is not None else np.nan),
    "mask_confidence": lambda r: float(np.mean(r["mask_confidence"])) if r["mask_confidence"] else np.nan,
    # uses the other instances' train photos: NOT available to a check (they are in the pool)
    "diagnostic_sibling_gap_gain": lambda r: r["diag_sib_gap_A"] - r["diag_sib_gap_P"],
}


def summarise(rows: dict[str, dict]) -> dict:
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    names = sorted(rows)
    d_ap = np.array([rows[n]["ap_A"] - rows[n]["ap_P"] for n in names])
    drop = d_ap < -3.0
    out: dict = {"instances": len(names), "adapter_drops_more_than_3_ap": int(drop.sum()), "signals": {}}
    for sig, f in SIGNALS.items():
        v = np.array([f(rows[n]) for n in names], float)
        ok = ~np.isnan(v)
        rho = spearmanr(v[ok], d_ap[ok]).correlation if ok.sum() > 2 else float("nan")
        a = roc_auc_score(drop[ok], -v[ok]) if drop[ok].any() and (~drop[ok]).any() else float("nan")
        out["signals"][sig] = {"spearman_with_delta_ap": round(float(rho), 3),
                               "auc_low_value_predicts_drop": round(float(a), 3), "n": int(ok.sum())}
    variants = {"adapter alone": ("ap_A", "ndcg_A")}
    for w in (75, 50, 25):
        variants[f"pretrained_share {1 - w / 100:.2f}"] = (f"ens{w}_ap", f"ens{w}_ndcg")
    out["blend"] = {}
    for label, (ka, kn) in variants.items():
        da = np.array([rows[n][ka] - rows[n]["ap_P"] for n in names])
        dn = np.array([rows[n][kn] - rows[n]["ndcg_P"] for n in names])
        out["blend"][label] = {"delta_ap": round(float(da.mean()), 2), "improved_ap": f"{int((da > 0).sum())}/{len(da)}",
                               "worst_ap": round(float(da.min()), 2), "delta_ndcg": round(float(dn.mean()), 2),
                               "improved_ndcg": f"{int((dn > 0).sum())}/{len(dn)}",
                               "improved_both": f"{int(((da > 0) & (dn > 0)).sum())}/{len(da)}"}
    return out


if __name__ == "__main__":
    sys.exit(main())
