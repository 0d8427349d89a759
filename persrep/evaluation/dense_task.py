"""Detection and segmentation of one instance over the whole dense pool, as tidy scores.

Wires :mod:`persrep.evaluation.dense` (predictions) to :mod:`persrep.evaluation.coco_eval`
(scoring). Every image of the pool is predicted on; ground truth exists only on the
instance's own images, so predictions elsewhere are false positives (the paper's protocol;
../shared/docs/REFERENCE.md, not in this repository).

Metrics: ``detection``: map, map50, f1_50 (iouType bbox); ``segmentation``: map, map50, f1_50
(iouType segm) and ``mean_iou`` = mean IoU of the predicted vs GT mask over the instance's own
images (an empty prediction counts as IoU 0).

Missing inputs give a :class:`~persrep.evaluation.records.Skipped` record per task with the
reason, never a silent omission: no dense pool, no training mask, or an own test image
without a GT mask (scoring it as "no object" would turn correct predictions into false
positives).

Dense features are read one image at a time (``pool.features[i]``), so the pool may be a
memory-mapped ``[N, D, h, w]`` array on disk (see :mod:`persrep.evaluation.cache`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from persrep.evaluation.coco_eval import Detection, EvalImage, coco_evaluate, encode_mask, mask_iou
from persrep.evaluation.dense import Combine, build_reference, predict
from persrep.evaluation.records import Score, Skipped

__all__ = ["DENSE_TASKS", "DensePool", "DenseTrainSet", "evaluate_dense"]

DENSE_TASKS = ("detection", "segmentation")


@dataclass(frozen=True)
class DensePool:
    """The dense evaluation pool (e.g. PODS ``test_dense``), shared by every instance."""

    features: Sequence  # per image [D, h, w]; array, memmap or lazy sequence
    labels: np.ndarray  # [N] instance index of each image
    image_sizes: np.ndarray  # [N, 2] (height, width) of each original image
    masks: Sequence[np.ndarray | None] | None = None  # GT masks [H, W]; read for own images only

    def __post_init__(self):
        n = len(self.labels)
        if len(self.features) != n or len(self.image_sizes) != n:
            raise ValueError(f"dense pool: {len(self.features)} feature maps, {n} labels, "
                             f"{len(self.image_sizes)} image sizes; they must match")
        if self.masks is not None and len(self.masks) != n:
            raise ValueError(f"dense pool: {len(self.masks)} masks for {n} images")


@dataclass(frozen=True)
class DenseTrainSet:
    """An instance's training images seen densely: feature maps and (optional) masks."""

    features: Sequence  # [K] of [D, h, w]
    masks: Sequence[np.ndarray | None]


def _skip_all(tasks: Sequence[str], reason: str) -> list[Skipped]:
    return [Skipped(t, reason) for t in tasks]


def _missing_inputs(instance: int, pool: DensePool | None,
                    train: DenseTrainSet | None) -> str | None:
    if pool is None:
        return "no dense pool supplied (dense features of the test images)"
    if train is None:
        return f"no dense training set for instance {instance}"
    if not any(m is not None and np.asarray(m).any() for m in train.masks):
        return (f"instance {instance} has no training mask: the reference feature needs the "
                "mask of a training image (train_masks/)")
    if pool.masks is None:
        return "the dense pool has no ground-truth masks (test masks missing)"
    own = np.flatnonzero(np.asarray(pool.labels) == instance)
    if len(own) == 0:
        return f"instance {instance} has no image in the dense pool"
    missing = [int(i) for i in own if pool.masks[i] is None]
    if missing:
        return (f"{len(missing)} of {len(own)} dense-pool images of instance {instance} lack a "
                f"ground-truth mask (first: index {missing[0]})")
    return None


def evaluate_dense(
    instance: int,
    pool: DensePool | None,
    train: DenseTrainSet | None,
    tasks: Sequence[str] = DENSE_TASKS,
    combine: Combine = "max_mean",
    morph_radius: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> list[Score | Skipped]:
    """Detection and/or segmentation scores of ``instance`` on the dense pool.

    ``combine="mean"`` reproduces the reference's MAE setting. ``progress(done, total)`` is
    called after each image.
    """
    tasks = [t for t in tasks if t in DENSE_TASKS]
    if not tasks:
        return []
    reason = _missing_inputs(instance, pool, train)
    if reason is not None:
        return _skip_all(tasks, reason)
    reference = build_reference(train.features, train.masks, combine)
    labels = np.asarray(pool.labels)
    images, boxes, segments, ious = [], [], [], []
    for i in range(len(labels)):
        size = (int(pool.image_sizes[i][0]), int(pool.image_sizes[i][1]))
        own = labels[i] == instance
        gt_mask = np.asarray(pool.masks[i]) > 0 if own else None
        images.append(EvalImage.from_mask(i, gt_mask, size))
        pred = predict(np.asarray(pool.features[i]), size, reference, morph_radius)
        if own:
            ious.append(mask_iou(pred.mask, gt_mask))
        if pred.box is not None:
            boxes.append(Detection(i, pred.score, pred.box))
            if "segmentation" in tasks:
                segments.append(Detection(i, pred.score, pred.box, encode_mask(pred.mask)))
        if progress is not None:
            progress(i + 1, len(labels))
    results: list[Score | Skipped] = []
    if "detection" in tasks:
        metrics = coco_evaluate(images, boxes, "bbox")
        results += [Score("detection", k, v) for k, v in metrics.as_dict().items()]
    if "segmentation" in tasks:
        metrics = coco_evaluate(images, segments, "segm")
        results += [Score("segmentation", k, v) for k, v in metrics.as_dict().items()]
        results.append(Score("segmentation", "mean_iou", float(np.mean(ious))))
    return results
