"""A few concrete predictions per instance, kept with an evaluation unit for the report's gallery.

The metrics say *how well*; these say *what happened* on fixed, not cherry-picked images, the same
for the pretrained backbone and every adapter, so the report can put them side by side:

- retrieval: the instance's first ``n_queries`` test images (pool order) and the top-``k`` gallery
  images each one ranks first (cosine similarity, the retrieval protocol's ranking), with which
  of them show the instance;
- dense: the instance's first ``n_dense`` images of the dense pool: the predicted box, the
  predicted mask (down-sampled to at most ``mask_side`` pixels, bit-packed) and its confidence,
  next to the ground-truth box, and the mask IoU at full resolution.

Everything is JSON (``examples.json`` in the evaluation unit); image references are paths
relative to the data set root.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

import numpy as np

from persrep.evaluation.coco_eval import mask_iou
from persrep.evaluation.dense import build_reference, mask_box, predict
from persrep.evaluation.features import cosine_similarity_matrix

__all__ = ["retrieval_examples", "dense_examples", "pack_mask", "unpack_mask"]


def retrieval_examples(test_embeddings: np.ndarray, test_labels: np.ndarray, test_paths: Sequence[str],
                       gallery_embeddings: np.ndarray, gallery_labels: np.ndarray,
                       gallery_paths: Sequence[str], instance: int, n_queries: int = 2,
                       k: int = 5) -> list[dict[str, Any]]:
    own = np.flatnonzero(np.asarray(test_labels) == instance)[:n_queries]
    if len(own) == 0 or len(gallery_labels) == 0:
        return []
    sims = cosine_similarity_matrix(np.asarray(test_embeddings)[own], np.asarray(gallery_embeddings))
    out = []
    for q, row in zip(own, sims):
        top = np.argsort(-row, kind="stable")[:k]
        out.append({"query": test_paths[q], "hits": [gallery_paths[j] for j in top],
                    "correct": [bool(gallery_labels[j] == instance) for j in top],
                    "scores": [round(float(row[j]), 4) for j in top]})
    return out


def pack_mask(mask: np.ndarray, side: int = 64) -> dict[str, Any]:
    """A binary mask down-sampled (nearest) so its longer side is at most ``side``, bit-packed."""
    m = np.asarray(mask, dtype=bool)
    h, w = m.shape
    scale = min(1.0, side / max(h, w))
    hh, ww = max(1, round(h * scale)), max(1, round(w * scale))
    rows = (np.arange(hh) * h / hh).astype(int)
    cols = (np.arange(ww) * w / ww).astype(int)
    small = m[rows][:, cols]
    return {"shape": [hh, ww], "bits": base64.b64encode(np.packbits(small).tobytes()).decode()}


def unpack_mask(packed: dict[str, Any]) -> np.ndarray:
    hh, ww = packed["shape"]
    bits = np.frombuffer(base64.b64decode(packed["bits"]), dtype=np.uint8)
    return np.unpackbits(bits)[: hh * ww].reshape(hh, ww).astype(bool)


def dense_examples(pool: Any, pool_paths: Sequence[str], train: Any, instance: int, n_dense: int = 2,
                   combine: str = "max_mean", morph_radius: int = 1,
                   mask_side: int = 64) -> list[dict[str, Any]]:
    """Predictions on the instance's first ``n_dense`` dense-pool images (``pool``: a DensePool,
    ``train``: the instance's DenseTrainSet); [] when the dense task could not run."""
    if pool is None or train is None or pool.masks is None:
        return []
    if not any(m is not None and np.asarray(m).any() for m in train.masks):
        return []
    reference = build_reference(train.features, train.masks, combine)
    own = np.flatnonzero(np.asarray(pool.labels) == instance)[:n_dense]
    out = []
    for i in own:
        size = (int(pool.image_sizes[i][0]), int(pool.image_sizes[i][1]))
        gt = pool.masks[i]
        if gt is None:
            continue
        gt = np.asarray(gt) > 0
        pred = predict(np.asarray(pool.features[i]), size, reference, morph_radius)
        score = pred.score if pred.box is not None else None
        out.append({"image": pool_paths[i], "size": list(size), "gt_box": list(mask_box(gt) or []),
                    "pred_box": list(pred.box) if pred.box is not None else None,
                    "score": None if score is None else round(float(score), 4),
                    "iou": round(float(mask_iou(pred.mask, gt)), 4),
                    "pred_mask": pack_mask(pred.mask, mask_side)})
    return out
