#!/usr/bin/env python
"""Automatic masks vs COIL-100's provided masks: IoU per instance for each segmenter variant.

For every COIL object in ``../shared/data/coil100_subset`` (17 objects, 72 views each), the views
``--views`` (default the six views 0, 12, ..., 60: the train views 0/24/48 and three between) are
segmented by each variant and compared with ``coil100_subset_masks``. Reported per variant: mean
IoU per instance, mean +- std over instances, the worst instance, mean confidence, the Pearson
correlation between confidence and IoU over images, and seconds per image. SAM and PerSAM run only
when ``--sam-model`` names weights that exist here (a local directory or the HF cache): on the
machines this project is developed on there are none, and the JSON says so.

    .venv/bin/python bench/masks.py                      # ~3-6 min on 2 cores
    .venv/bin/python bench/masks.py --sam-model /models/sam-vit-base
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from persrep.config import SegmentationSettings  # noqa: E402
from persrep.segmentation import Reference, SegmenterUnavailableError, get_segmenter, require_available  # noqa: E402
from persrep.segmentation.dataset import mask_iou  # noqa: E402

VARIANTS = {  # name -> (segmenter, settings overrides); grabcut_box = the defaults
    "grabcut_box": ("grabcut", {"init": "box"}),
    "grabcut_box_margin0.08": ("grabcut", {"init": "box", "margin": 0.08}),
    "grabcut_box_margin0.15": ("grabcut", {"init": "box", "margin": 0.15}),
    "grabcut_prior": ("grabcut", {"init": "prior"}),
    "grabcut_auto": ("grabcut", {"init": "auto"}),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("PERSREP_SHARED_DATA", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--views", default="0,12,24,36,48,60")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--sam-model", default="none", help="SAM weights (model id in the HF cache or a directory)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(REPO / "bench" / "masks.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    root, mroot = Path(args.data) / "coil100_subset", Path(args.data) / "coil100_subset_masks"
    if not mroot.is_dir():
        sys.exit(f"COIL masks not found at {mroot}: set PERSREP_SHARED_DATA")
    views = [int(v) for v in args.views.split(",")]
    objs = sorted(p.name for p in mroot.iterdir() if p.is_dir())
    data = {o: ([Image.open(root / o / f"{v}.png").convert("RGB") for v in views],
                [np.asarray(Image.open(mroot / o / f"{v}.png").convert("L")) > 0 for v in views]) for o in objs}
    variants = {k: VARIANTS[k] for k in args.variants.split(",") if k}
    skipped = {}
    for sam_name in ("sam", "persam"):
        try:
            require_available(sam_name, SegmentationSettings(segmenter=sam_name, model=args.sam_model))
            variants[sam_name] = (sam_name, {"model": args.sam_model})
        except SegmenterUnavailableError as exc:
            skipped[sam_name] = (f"not run: no SAM checkpoint given or found on this machine (none exists "
                                 f"here and nothing may be downloaded; pass --sam-model DIR_OR_ID): {exc}")
    results = {}
    for vname, (seg_name, over) in variants.items():
        seg = get_segmenter(seg_name, SegmentationSettings(segmenter=seg_name, **over))
        seg.segment([data[objs[0]][0][0]])  # warm-up (model build) outside the timing
        per_inst, confs, ious, t0 = {}, [], [], time.perf_counter()
        for o in objs:
            images, gts = data[o]
            # PerSAM: the first view with its provided mask is the reference, the others are segmented
            ref = Reference(images[:1], gts[:1]) if seg.needs.reference else None
            imgs, gt = (images[1:], gts[1:]) if ref else (images, gts)
            outs = seg.segment(imgs, ref)
            vals = [mask_iou(s.mask, g) for s, g in zip(outs, gt)]
            per_inst[o] = float(np.mean(vals))
            ious += vals
            confs += [s.confidence for s in outs]
        secs = (time.perf_counter() - t0) / len(ious)
        inst = np.array(list(per_inst.values()))
        results[vname] = {"segmenter": seg_name, "settings": seg.identity(), "images": len(ious),
                          "iou_mean_over_instances": float(inst.mean()), "iou_std_over_instances": float(inst.std(ddof=1)),
                          "iou_worst_instance": [min(per_inst, key=per_inst.get), float(inst.min())],
                          "instances_iou_ge_0.7": int((inst >= 0.7).sum()), "n_instances": len(inst),
                          "confidence_mean": float(np.mean(confs)),
                          "confidence_iou_pearson": float(np.corrcoef(confs, ious)[0, 1]) if np.std(confs) > 0 else None,
                          "seconds_per_image": round(secs, 3), "per_instance_iou": per_inst}
        r = results[vname]
        print(f"{vname:24s} IoU {r['iou_mean_over_instances']:.3f} ± {r['iou_std_over_instances']:.3f} "
              f"(worst {r['iou_worst_instance'][0]} {r['iou_worst_instance'][1]:.2f}, "
              f">=0.7: {r['instances_iou_ge_0.7']}/{len(inst)}) conf {r['confidence_mean']:.2f} "
              f"r(conf,IoU) {r['confidence_iou_pearson'] if r['confidence_iou_pearson'] is None else round(r['confidence_iou_pearson'], 2)} "
              f"{secs:.2f} s/image", flush=True)
    for k, v in skipped.items():
        print(f"{k:24s} {v}")
    doc = {"timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "command": "bench/masks.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "data": "COIL-100 subset (17 objects) vs coil100_subset_masks", "views": views,
           "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                       "torch_threads": torch.get_num_threads(), "loadavg_at_end": os.getloadavg()},
           "results": results, "skipped": skipped}
    out = Path(args.out)
    tmp = out.with_suffix(".json.partial")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
