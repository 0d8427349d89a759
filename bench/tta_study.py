"""Test-time augmentation on a finished run's adapters (#26 lever 5, inference): does it pay?

Reads a finished real-photo run (its adapters and results.parquet), embeds the evaluation pool
once through the frozen prefix (persrep/models/prefix.py) for each input view, and each adapter's
tail on every view. Per instance and per variant it computes the classification AP and retrieval
NDCG of the pretrained model and of the shipped personalised model (the adapter blended with the
pretrained feature at ``evaluation.pretrained_share``, persrep/models/blend.py), exactly as the
evaluation stage does; ``plain`` must reproduce the run's own figures (checked, printed).

Variants (each applied to the pretrained model too, so the delta stays like for like):
- ``plain``: the evaluation as shipped (short side resized, centre crop).
- ``flip``: every image's feature is the mean of its own and its mirror image's (pool and train).
- ``flip_train``: the train photos' mirror images added as extra references (max cosine over 6);
  the searched photos are embedded once, as in ``plain`` (free at search time).
- ``crops_train``: the train photos plus their mirror images and 4 corner crops (80 % of each
  side) as references (max over 18); free at search time too.
- ``whole``: the whole photo squashed to the input size instead of the centre crop.
- ``res224``: the same centre crop at 224 px instead of the configured size (the adapters were
  trained at the configured size; EfficientNet-Lite0 was pretrained at 224).

    python bench/tta_study.py --storage <root> --run final --out bench/tta_study.json   # ~25 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PERSREP_SHARED_DATA", REPO.parent / "shared" / "data"))
VARIANTS = ("plain", "flip", "flip_train", "crops_train", "whole", "res224")


def l2(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)


def corner_crops(im: Image.Image, side: float = 0.8) -> list[Image.Image]:
    w, h = im.size
    cw, ch = int(w * side), int(h * side)
    return [im.crop((x, y, x + cw, y + ch)) for x, y in ((0, 0), (w - cw, 0), (0, h - ch), (w - cw, h - ch))]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--storage", required=True)
    ap.add_argument("--run", default="final")
    ap.add_argument("--config", default="offline-real")
    ap.add_argument("--data", default=str(SHARED / "grocery_produce"))
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_grad_enabled(False)

    from persrep.config import load_settings
    from persrep.data.layout import open_dataset
    from persrep.evaluation.classification import instance_scores
    from persrep.evaluation.metrics import average_precision
    from persrep.evaluation.retrieval import per_query_metrics
    from persrep.evaluation.stage import Pools
    from persrep.models.backbones import build_backbone, eval_transform
    from persrep.models.lora import load_adapter
    from persrep.models.prefix import global_from_map, prefix_split, run_prefix, run_tail

    t0 = time.time()
    storage = Path(args.storage)
    settings = load_settings(args.config)
    bs = settings.personalization.backbones[0]
    feature, share = settings.evaluation.global_feature, settings.evaluation.pretrained_share
    ds = open_dataset(args.data)
    p = Pools.of(ds)
    res = pd.read_parquet(storage / "runs" / args.run / "results.parquet")
    res = res[res["scene"] == "all"] if "scene" in res else res
    pers = res[res["model"] == "personalised"]
    adapter_of = dict(zip(pers["instance"], pers["adapter_key"]))

    crop_tf, whole_tf = eval_transform(bs), eval_transform(bs, center_crop=False)
    big_tf = eval_transform(bs, size=224)
    test_imgs = [ds.read_image(f) for f in p.test]
    train_imgs = [ds.read_image(f) for f in p.train]
    flip = lambda ims: [im.transpose(Image.FLIP_LEFT_RIGHT) for im in ims]  # noqa: E731
    train_crops = [c for im in train_imgs for c in corner_crops(im)]
    crop_labels = np.repeat(p.train_labels, 4)
    views = {"test": (test_imgs, crop_tf), "test_flip": (flip(test_imgs), crop_tf),
             "test_whole": (test_imgs, whole_tf), "train": (train_imgs, crop_tf),
             "train_flip": (flip(train_imgs), crop_tf), "train_whole": (train_imgs, whole_tf),
             "train_crops": (train_crops, crop_tf), "test_224": (test_imgs, big_tf),
             "train_224": (train_imgs, big_tf)}

    base = build_backbone(bs).eval()
    probe = load_adapter(build_backbone(bs), storage / "adapters" / next(iter(adapter_of.values()))
                         / "adapter.safetensors")
    split = prefix_split(probe)
    assert split is not None, "this study needs a CNN adapter with a frozen prefix"
    prefix = {}
    for v, (ims, tf) in views.items():
        prefix[v] = torch.cat([run_prefix(base, torch.stack([tf(im) for im in ims[i:i + 64]]), split)
                               for i in range(0, len(ims), 64)])
    print(f"prefix activations of {sum(len(x) for x in prefix.values())} images: {time.time() - t0:.0f} s",
          flush=True)

    def tails(model) -> dict[str, np.ndarray]:
        return {v: l2(torch.cat([global_from_map(run_tail(model, h[i:i + 128], split)[0], feature)
                                 for i in range(0, len(h), 128)]).numpy()) for v, h in prefix.items()}

    def blended(a: dict, pre: dict) -> dict:
        if share == 0:
            return a
        return {v: np.concatenate([np.sqrt(1 - share) * a[v], np.sqrt(share) * pre[v]], 1) for v in a}

    def pools(f: dict) -> dict[str, tuple]:
        """variant -> (test features, train features, train labels, scoring mode)."""
        mean = lambda x, y: l2(x + y)  # noqa: E731 - the mean feature of a photo and its mirror, unit norm
        tl = p.train_labels
        return {"plain": (f["test"], f["train"], tl),
                "flip": (mean(f["test"], f["test_flip"]), mean(f["train"], f["train_flip"]), tl),
                "flip_train": (f["test"], np.concatenate([f["train"], f["train_flip"]]), np.concatenate([tl, tl])),
                "crops_train": (f["test"], np.concatenate([f["train"], f["train_flip"], f["train_crops"]]),
                                np.concatenate([tl, tl, crop_labels])),
                "whole": (f["test_whole"], f["train_whole"], tl),
                "res224": (f["test_224"], f["train_224"], tl)}

    def scores(pool: tuple, i: int) -> tuple[float, float]:
        test, train, labels = pool
        cls = average_precision(p.test_labels == i, instance_scores(test, train[labels == i]))
        q = test[p.test_labels == i]
        nd = per_query_metrics(q, train, labels, i)["ndcg"]
        return round(cls * 100, 3), round(float(np.nanmean(nd)) * 100, 3)

    pre_f = tails(base)
    pre_pools = pools(pre_f)
    rows: dict[str, dict] = {}
    for name in sorted(adapter_of):
        i = p.names.index(name)
        model = load_adapter(build_backbone(bs), storage / "adapters" / adapter_of[name] / "adapter.safetensors").eval()
        pers_pools = pools(blended(tails(model), pre_f))
        row = {}
        for v in VARIANTS:
            (row[f"{v}_ap_P"], row[f"{v}_ndcg_P"]), (row[f"{v}_ap_A"], row[f"{v}_ndcg_A"]) = \
                scores(pre_pools[v], i), scores(pers_pools[v], i)
        r = res[res["instance"] == name]
        for model_name, tag in (("pretrained", "P"), ("personalised", "A")):
            for task, metric in (("classification", "ap"), ("retrieval", "ndcg")):
                val = r[(r["model"] == model_name) & (r["task"] == task) & (r["metric"] == metric)]["value"]
                row[f"run_{metric}_{tag}"] = round(float(val.iloc[0]) * 100, 3) if len(val) else None
        rows[name] = row
        print(name, {k: row[k] for k in ("run_ap_P", "plain_ap_P", "run_ap_A", "plain_ap_A",
                                         "flip_ap_A", "flip_train_ap_A", "crops_train_ap_A")}, flush=True)
    out = {"what": __doc__.split("\n")[0], "run": str(storage / "runs" / args.run), "config": args.config,
           "pretrained_share": share, "seconds": round(time.time() - t0, 1),
           "summary": summarise(rows), "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out["summary"], indent=1))
    return 0


def summarise(rows: dict[str, dict]) -> dict:
    names = sorted(rows)
    col = lambda k: np.array([rows[n][k] for n in names], float)  # noqa: E731
    out: dict = {"instances": len(names),
                 "plain_reproduces_run": {
                     "max_abs_diff_ap": round(float(np.nanmax(np.abs(col("plain_ap_A") - col("run_ap_A")))), 4),
                     "max_abs_diff_ndcg": round(float(np.nanmax(np.abs(col("plain_ndcg_A") - col("run_ndcg_A")))), 4)}}
    for v in VARIANTS:
        da, dn = col(f"{v}_ap_A") - col(f"{v}_ap_P"), col(f"{v}_ndcg_A") - col(f"{v}_ndcg_P")
        da0 = col(f"{v}_ap_A") - col("plain_ap_P")
        dn0 = col(f"{v}_ndcg_A") - col("plain_ndcg_P")
        out[v] = {"pretrained_ap": round(float(col(f"{v}_ap_P").mean()), 2),
                  "personalised_ap": round(float(col(f"{v}_ap_A").mean()), 2),
                  "delta_ap": round(float(da.mean()), 2), "improved_ap": f"{int((da > 0).sum())}/{len(da)}",
                  "worst_ap": round(float(da.min()), 2),
                  "pretrained_ndcg": round(float(col(f"{v}_ndcg_P").mean()), 2),
                  "personalised_ndcg": round(float(col(f"{v}_ndcg_A").mean()), 2),
                  "delta_ndcg": round(float(dn.mean()), 2), "improved_ndcg": f"{int((dn > 0).sum())}/{len(dn)}",
                  "improved_both": f"{int(((da > 0) & (dn > 0)).sum())}/{len(da)}",
                  "delta_ap_vs_plain_pretrained": round(float(da0.mean()), 2),
                  "delta_ndcg_vs_plain_pretrained": round(float(dn0.mean()), 2)}
    return out


if __name__ == "__main__":
    sys.exit(main())
