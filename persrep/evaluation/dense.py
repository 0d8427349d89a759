"""Training-free detection and segmentation of one instance from dense patch features.

Pipeline (the released ``downstream/dense_tasks.py``; ../shared/docs/REFERENCE.md, not in this repository):

1. Dense features ``[D, h, w]`` are L2-normalised per patch.
2. Reference feature, from the instance's first training image that has a mask: the patches
   under the mask, combined as ``0.5 * max + 0.5 * mean`` (element-wise max over the masked
   patch features; ``combine="mean"`` for MAE, as the reference does), then L2-normalised.
3. Cosine similarity of every test patch to the reference -> ``[h, w]`` map -> bilinear
   upsampling to the image size -> min-max normalisation -> Otsu threshold -> clean-up ->
   predicted mask. An image whose map is constant yields no prediction.
4. Box = the mask's extent. Confidence = max cosine between the test box-mean feature (mean of
   the dense features of the patches inside the box) and the box-mean feature of every
   training image with a mask (box from that image's mask).

Deliberate deviations (each makes the rule simpler to state and identical for train and test):

- Mask -> patch grid: a patch belongs to a mask when at least ``min_coverage`` (0.5) of its
  area is covered (area-averaged downsampling). The reference samples the mask bilinearly and
  keeps patches with a value > 0 for masks and train boxes but == 1 for test boxes. When no patch
  reaches the threshold (tiny objects) the best-covered patches are used, so a non-empty mask
  never gives an empty patch set.
- Clean-up: binary opening then closing with a disk of ``morph_radius`` pixels, then keep the
  largest connected component (8-connectivity) and fill its holes. The reference does
  ``remove_small_objects(100)`` + closing + dilation/erosion and then keeps the largest
  external contour, filled - the same intent (one solid blob, specks dropped).
- Boxes follow COCO pixel conventions: ``[x, y, w, h]`` with ``w = x_max - x_min + 1`` (the
  reference uses ``x_max - x_min``, one pixel short).
- The patch grid is assumed to cover the whole image (the extractor resizes the image, e.g.
  to 896 x 896, without padding); the reference pads SAM-style and crops the padding back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.morphology import closing, disk, opening

__all__ = [
    "Combine", "Box", "DensePrediction", "InstanceReference",
    "normalize_dense", "patch_coverage", "mask_on_patch_grid", "box_on_patch_grid",
    "reference_feature", "similarity_map", "predict_mask", "clean_mask", "mask_box",
    "box_mean_feature", "build_reference", "predict",
]

Combine = Literal["max_mean", "mean"]
Box = tuple[int, int, int, int]  # COCO [x, y, w, h] in pixels
MIN_COVERAGE = 0.5


# ---------------------------------------------------------------------------------------------
# features and the patch grid
def normalize_dense(features) -> np.ndarray:
    """L2-normalise ``[..., D, h, w]`` features along the channel axis (float32)."""
    f = np.asarray(features, dtype=np.float32)
    if f.ndim < 3:
        raise ValueError(f"dense features must be [..., D, h, w], got shape {f.shape}")
    norm = np.linalg.norm(f, axis=-3, keepdims=True)
    return f / np.maximum(norm, 1e-12)


def patch_coverage(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Fraction of each patch covered by a full-resolution binary mask (``[h, w]`` in [0, 1])."""
    m = torch.as_tensor(np.asarray(mask) > 0, dtype=torch.float32)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-d [H, W], got shape {tuple(m.shape)}")
    return F.adaptive_avg_pool2d(m[None, None], grid)[0, 0].numpy()


def _select_patches(coverage: np.ndarray, min_coverage: float) -> np.ndarray:
    best = coverage.max() if coverage.size else 0.0
    if best <= 0:
        return np.zeros(coverage.shape, dtype=bool)
    # tiny objects cover no patch by half: fall back to the best-covered patches
    return coverage >= min(min_coverage, best)


def mask_on_patch_grid(mask: np.ndarray, grid: tuple[int, int],
                       min_coverage: float = MIN_COVERAGE) -> np.ndarray:
    """Boolean ``[h, w]``: patches at least ``min_coverage`` covered by ``mask``."""
    return _select_patches(patch_coverage(mask, grid), min_coverage)


def box_on_patch_grid(box: Box, image_size: tuple[int, int], grid: tuple[int, int],
                      min_coverage: float = MIN_COVERAGE) -> np.ndarray:
    """Boolean ``[h, w]``: patches at least ``min_coverage`` inside ``box`` (exact overlaps)."""
    (height, width), (gh, gw) = image_size, grid
    x, y, w, h = box

    def overlap(lo: float, hi: float, size: int, cells: int) -> np.ndarray:
        edges = np.arange(cells + 1) * (size / cells)
        inter = np.clip(np.minimum(edges[1:], hi) - np.maximum(edges[:-1], lo), 0, None)
        return inter / (size / cells)

    coverage = np.outer(overlap(y, y + h, height, gh), overlap(x, x + w, width, gw))
    return _select_patches(coverage, min_coverage)


# ---------------------------------------------------------------------------------------------
# reference feature and similarity
def reference_feature(dense: np.ndarray, mask: np.ndarray, combine: Combine = "max_mean",
                      min_coverage: float = MIN_COVERAGE) -> np.ndarray:
    """The instance's prototype ``[D]`` from one image's dense features and its object mask."""
    f = normalize_dense(dense)
    patches = mask_on_patch_grid(mask, f.shape[-2:], min_coverage)
    if not patches.any():
        raise ValueError("the reference mask is empty: the reference feature needs a non-empty "
                         "mask on the first training image")
    masked = f[:, patches].T  # [P, D]
    if combine == "max_mean":
        ref = 0.5 * masked.max(axis=0) + 0.5 * masked.mean(axis=0)
    elif combine == "mean":
        ref = masked.mean(axis=0)
    else:
        raise ValueError(f"combine must be 'max_mean' or 'mean', got {combine!r}")
    return ref / max(float(np.linalg.norm(ref)), 1e-12)


def similarity_map(dense: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Cosine similarity ``[h, w]`` of every patch to the (unit) reference feature."""
    f = normalize_dense(dense)
    return np.einsum("dhw,d->hw", f, np.asarray(reference, dtype=np.float32))


# ---------------------------------------------------------------------------------------------
# mask, box, confidence
def clean_mask(mask: np.ndarray, morph_radius: int = 1) -> np.ndarray:
    """Opening + closing (disk), largest 8-connected component, holes filled."""
    m = np.asarray(mask, dtype=bool)
    if morph_radius > 0:
        footprint = disk(morph_radius)
        m = closing(opening(m, footprint), footprint)
    labels, n = ndimage.label(m, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return np.zeros_like(m)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    largest = int(np.argmax(sizes))
    # holes lie inside the blob's bounding box, so filling the crop is exact and much cheaper
    crop = ndimage.find_objects(labels, max_label=largest)[largest - 1]
    out = np.zeros_like(m)
    out[crop] = ndimage.binary_fill_holes(labels[crop] == largest)
    return out


def predict_mask(similarity: np.ndarray, image_size: tuple[int, int],
                 morph_radius: int = 1) -> np.ndarray:
    """Similarity map ``[h, w]`` -> predicted binary mask ``[H, W]`` (empty if map is flat)."""
    sim = torch.as_tensor(np.asarray(similarity, dtype=np.float32))[None, None]
    up = F.interpolate(sim, size=tuple(image_size), mode="bilinear", align_corners=False)[0, 0]
    up = up.numpy()
    lo, hi = float(up.min()), float(up.max())
    if not hi - lo > 1e-12:
        return np.zeros(tuple(image_size), dtype=bool)
    normalised = (up - lo) / (hi - lo)
    return clean_mask(normalised > threshold_otsu(normalised), morph_radius)


def mask_box(mask: np.ndarray) -> Box | None:
    """COCO box ``[x, y, w, h]`` of the mask's extent (inclusive pixels); ``None`` if empty."""
    m = np.asarray(mask, dtype=bool)
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    if len(rows) == 0:
        return None
    return (int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1))


def box_mean_feature(dense: np.ndarray, box: Box, image_size: tuple[int, int],
                     min_coverage: float = MIN_COVERAGE) -> np.ndarray:
    """Mean of the (normalised) patch features inside ``box`` (``[D]``, not re-normalised)."""
    f = normalize_dense(dense)
    patches = box_on_patch_grid(box, image_size, f.shape[-2:], min_coverage)
    if not patches.any():
        raise ValueError(f"box {box} covers no patch of a {image_size} image")
    return f[:, patches].mean(axis=1)


# ---------------------------------------------------------------------------------------------
# one instance
@dataclass(frozen=True)
class InstanceReference:
    """What the dense tasks know about one instance, built once from its training images."""

    feature: np.ndarray  # [D] unit prototype
    train_box_features: np.ndarray  # [K, D] box-mean features of the masked training images
    reference_index: int  # which training image gave the prototype


@dataclass(frozen=True)
class DensePrediction:
    mask: np.ndarray  # bool [H, W]
    box: Box | None  # None: nothing predicted
    score: float  # nan when box is None


def build_reference(train_features: Sequence, train_masks: Sequence[np.ndarray | None],
                    combine: Combine = "max_mean",
                    min_coverage: float = MIN_COVERAGE) -> InstanceReference:
    """Prototype from the first training image with a non-empty mask; box features from all."""
    if len(train_features) != len(train_masks):
        raise ValueError(f"{len(train_features)} training feature maps for "
                         f"{len(train_masks)} training masks")
    usable = [i for i, m in enumerate(train_masks) if m is not None and np.asarray(m).any()]
    if not usable:
        raise ValueError("no training image has a non-empty mask")
    first = usable[0]
    feature = reference_feature(train_features[first], train_masks[first], combine, min_coverage)
    boxes = []
    for i in usable:
        mask = np.asarray(train_masks[i])
        boxes.append(box_mean_feature(train_features[i], mask_box(mask), mask.shape,
                                      min_coverage))
    return InstanceReference(feature, np.stack(boxes), first)


def predict(dense: np.ndarray, image_size: tuple[int, int], reference: InstanceReference,
            morph_radius: int = 1, min_coverage: float = MIN_COVERAGE) -> DensePrediction:
    """Mask, box and confidence for one image given the instance reference."""
    mask = predict_mask(similarity_map(dense, reference.feature), image_size, morph_radius)
    box = mask_box(mask)
    if box is None:
        return DensePrediction(mask, None, float("nan"))
    test_feature = box_mean_feature(dense, box, image_size, min_coverage)
    a = test_feature / max(float(np.linalg.norm(test_feature)), 1e-12)
    b = reference.train_box_features
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return DensePrediction(mask, box, float((b @ a).max()))
