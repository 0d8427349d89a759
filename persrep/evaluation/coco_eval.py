"""COCO-style scoring of one instance's detections/masks with a single category (pycocotools).

Every pool image is an evaluation image. Only the instance's own images carry a ground-truth
object (box from the GT mask's extent, mask as RLE); every prediction on another instance's
image is therefore a false positive. At most one detection per image (the dense pipeline
predicts one blob), so COCO's ``maxDets=100`` never truncates.

Metrics (``iouType`` ``"bbox"`` or ``"segm"``):

- ``map``: AP averaged over IoU 0.50:0.05:0.95 (``COCOeval.stats[0]``, area "all").
- ``map50``: AP at IoU 0.5 (``stats[1]``).
- ``f1_50``: the best F1 over confidence thresholds at IoU 0.5, i.e. ``max_t 2PR/(P+R)`` where
  P and R count the detections with score >= t, matched with COCO's own greedy matching
  (``evalImgs``); tied scores enter together. The reference code instead combines precision
  and recall averaged over COCO's 101 recall points, which is not an F1 of any operating point;
  the best-threshold F1 answers "how well could this detector do with its threshold tuned".

Edge cases: no ground-truth object -> every metric ``nan`` (undefined; COCO reports -1); no
detection at all -> 0 (every object missed). pycocotools' printing is suppressed.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = ["IouType", "EvalImage", "Detection", "CocoMetrics", "encode_mask", "mask_iou",
           "coco_evaluate", "best_f1"]

IouType = Literal["bbox", "segm"]
CATEGORY_ID = 1


def encode_mask(mask: np.ndarray) -> dict:
    """Compressed RLE of a binary ``[H, W]`` mask (pycocotools format)."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-d [H, W], got shape {m.shape}")
    return mask_utils.encode(np.asfortranarray(m > 0, dtype=np.uint8))


def mask_iou(predicted: np.ndarray, ground_truth: np.ndarray) -> float:
    """Intersection over union of two binary masks; 1.0 when both are empty."""
    p, g = np.asarray(predicted) > 0, np.asarray(ground_truth) > 0
    if p.shape != g.shape:
        raise ValueError(f"mask shapes differ: {p.shape} vs {g.shape}")
    union = np.logical_or(p, g).sum()
    return 1.0 if union == 0 else float(np.logical_and(p, g).sum() / union)


@dataclass(frozen=True)
class EvalImage:
    """One pool image: its size and, on the instance's own images, the object's GT."""

    image_id: int
    height: int
    width: int
    gt_box: tuple[float, float, float, float] | None = None  # COCO [x, y, w, h]
    gt_rle: dict | None = None

    @classmethod
    def from_mask(cls, image_id: int, gt_mask: np.ndarray | None,
                  size: tuple[int, int] | None = None) -> EvalImage:
        """GT from a binary mask (``None`` or empty: no object); size from the mask if absent."""
        if gt_mask is None or not np.asarray(gt_mask).any():
            if size is None:
                if gt_mask is None:
                    raise ValueError(f"image {image_id}: give its size when it has no mask")
                size = np.asarray(gt_mask).shape
            return cls(image_id, int(size[0]), int(size[1]))
        rle = encode_mask(gt_mask)
        box = tuple(float(v) for v in mask_utils.toBbox(rle))
        h, w = np.asarray(gt_mask).shape
        if size is not None and tuple(size) != (h, w):
            raise ValueError(f"image {image_id}: GT mask shape {(h, w)} != image size {tuple(size)}")
        return cls(image_id, h, w, box, rle)


@dataclass(frozen=True)
class Detection:
    image_id: int
    score: float
    box: tuple[float, float, float, float]  # COCO [x, y, w, h]
    rle: dict | None = None  # needed for "segm"


@dataclass(frozen=True)
class CocoMetrics:
    map: float
    map50: float
    f1_50: float
    n_objects: int
    n_detections: int

    def as_dict(self) -> dict[str, float]:
        return {"map": self.map, "map50": self.map50, "f1_50": self.f1_50}


def _ground_truth(images: Sequence[EvalImage]) -> COCO:
    annotations = []
    for img in images:
        if img.gt_box is None:
            continue
        annotations.append({"id": len(annotations) + 1, "image_id": img.image_id,
                            "category_id": CATEGORY_ID, "iscrowd": 0,
                            "area": float(mask_utils.area(img.gt_rle)),
                            "bbox": list(img.gt_box), "segmentation": img.gt_rle})
    coco = COCO()
    coco.dataset = {"images": [{"id": i.image_id, "height": i.height, "width": i.width}
                               for i in images],
                    "annotations": annotations,
                    "categories": [{"id": CATEGORY_ID, "name": "instance"}]}
    coco.createIndex()
    return coco


def _results(detections: Sequence[Detection], iou_type: IouType) -> list[dict]:
    out = []
    for d in detections:
        # loadRes takes the bbox branch whenever "bbox" is present, so give only what is scored
        if iou_type == "bbox":
            out.append({"image_id": d.image_id, "category_id": CATEGORY_ID,
                        "bbox": [float(v) for v in d.box], "score": float(d.score)})
        else:
            if d.rle is None:
                raise ValueError(f"detection on image {d.image_id} has no mask: 'segm' "
                                 "evaluation needs an RLE per detection")
            out.append({"image_id": d.image_id, "category_id": CATEGORY_ID,
                        "segmentation": d.rle, "score": float(d.score)})
    return out


def best_f1(coco_eval: COCOeval, iou: float = 0.5) -> float:
    """Best F1 over score thresholds at one IoU, from an evaluated ``COCOeval`` (area "all")."""
    p = coco_eval.params
    t = int(np.argmin(np.abs(np.asarray(p.iouThrs) - iou)))
    if abs(p.iouThrs[t] - iou) > 1e-9:
        raise ValueError(f"IoU {iou} is not one of the evaluated thresholds {p.iouThrs}")
    n_images, max_det = len(p.imgIds), p.maxDets[-1]
    area_all = 0  # evalImgs is laid out [category][area range][image]; "all" comes first
    scores, matched, n_objects = [], [], 0
    for e in coco_eval.evalImgs[area_all * n_images:(area_all + 1) * n_images]:
        if e is None:
            continue
        keep = ~np.asarray(e["dtIgnore"])[t, :max_det].astype(bool)
        scores.append(np.asarray(e["dtScores"])[:max_det][keep])
        matched.append(np.asarray(e["dtMatches"])[t, :max_det][keep] > 0)
        n_objects += int((~np.asarray(e["gtIgnore"]).astype(bool)).sum())
    if n_objects == 0:
        return float("nan")
    s = np.concatenate(scores) if scores else np.zeros(0)
    if len(s) == 0:
        return 0.0
    order = np.argsort(-s, kind="mergesort")
    s, tp = s[order], np.concatenate(matched)[order].astype(np.float64)
    ctp = np.cumsum(tp)
    n_det = np.arange(1, len(s) + 1)
    last_of_tie = np.append(s[1:] != s[:-1], True)  # a threshold cannot split tied scores
    precision, recall = ctp / n_det, ctp / n_objects
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(ctp > 0, 2 * precision * recall / (precision + recall), 0.0)
    return float(f1[last_of_tie].max())


def _stat(value: float) -> float:
    return float("nan") if value < 0 else float(value)


def coco_evaluate(images: Sequence[EvalImage], detections: Sequence[Detection],
                  iou_type: IouType) -> CocoMetrics:
    """mAP@[.5:.95], mAP50 and best F1@.5 of ``detections`` against ``images``' objects."""
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    ids = [i.image_id for i in images]
    if len(set(ids)) != len(ids):
        raise ValueError("image ids must be unique")
    unknown = {d.image_id for d in detections} - set(ids)
    if unknown:
        raise ValueError(f"detections on unknown image ids {sorted(unknown)[:5]}")
    n_objects = sum(i.gt_box is not None for i in images)
    nan = float("nan")
    if n_objects == 0:
        return CocoMetrics(nan, nan, nan, 0, len(detections))
    if not detections:
        return CocoMetrics(0.0, 0.0, 0.0, n_objects, 0)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = _ground_truth(images)
        dt = gt.loadRes(_results(detections, iou_type))
        coco_eval = COCOeval(gt, dt, iouType=iou_type)
        coco_eval.params.catIds = [CATEGORY_ID]
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return CocoMetrics(_stat(coco_eval.stats[0]), _stat(coco_eval.stats[1]),
                       best_f1(coco_eval, 0.5), n_objects, len(detections))
