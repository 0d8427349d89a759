"""An instance's train masks without annotation, robust to one bad photo.

A user's three photos are ordinary phone shots: a hand, a shelf, neighbours, a pile of the same
fruit. A segmenter may find nothing, a speck, or the whole frame in one of them. Such a mask must
never end the instance (issue #26). :func:`predict_instance_masks` therefore

1. segments every photo;
2. re-segments each photo whose mask is *unusable* (empty or under :data:`MIN_AREA` of the
   frame) or *weak* (confidence below ``min_confidence``) from the instance's other, confident
   photos (:meth:`Segmenter.refine`: the same object is in all three; GrabCut starts from the
   feature prior of their foregrounds), keeping the more confident of the two masks;
3. gives a photo that is still unusable a centred box (:data:`FALLBACK_MARGIN` off each side),
   confidence 0, labelled ``box_fallback``: the photo then still serves, as a loosely framed
   object, and the run's notes and report name it.

Every photo gets a :class:`PhotoMask` with its mask, confidence and ``source`` (``predicted``,
``refined`` or ``box_fallback``): the per-photo mask-quality figure a report shows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from persrep.segmentation.base import Reference, Segmentation, Segmenter

MIN_AREA = 0.005  # a mask under 0.5 % of the frame is a speck, not the object
FALLBACK_MARGIN = 0.1
PROCEDURE = 2  # enters the auto-mask unit key: bump when this module changes the masks it makes


@dataclass
class PhotoMask:
    mask: np.ndarray  # bool [H, W]
    confidence: float
    source: str  # predicted | refined | box_fallback

    def image(self) -> Image.Image:
        return Image.fromarray(self.mask.astype(np.uint8) * 255, mode="L")


def usable(mask: np.ndarray) -> bool:
    return bool(mask.any()) and float(mask.mean()) >= MIN_AREA


def box_mask(size: tuple[int, int], margin: float = FALLBACK_MARGIN) -> np.ndarray:
    """A centred box on a (W, H) frame, ``margin`` of each side left out."""
    w, h = size
    mask = np.zeros((h, w), dtype=bool)
    mx, my = int(round(margin * w)), int(round(margin * h))
    mask[my:h - my, mx:w - mx] = True
    return mask


def predict_instance_masks(segmenter: Segmenter, images: list[Image.Image],
                           min_confidence: float) -> list[PhotoMask]:
    """One :class:`PhotoMask` per photo, never an empty one (see the module docstring)."""
    first = segmenter.segment(images)
    out = [PhotoMask(s.mask.astype(bool), float(s.confidence), "predicted") for s in first]
    weak = [i for i, m in enumerate(out) if not usable(m.mask) or m.confidence < min_confidence]
    good = [i for i, m in enumerate(out) if usable(m.mask) and m.confidence >= min_confidence]
    if weak and good:
        ref = Reference([images[i] for i in good], [out[i].mask for i in good])
        again: list[Segmentation] = segmenter.refine([images[i] for i in weak], ref)
        for i, seg in zip(weak, again):
            cand = PhotoMask(seg.mask.astype(bool), float(seg.confidence), "refined")
            if usable(cand.mask) and (not usable(out[i].mask) or cand.confidence > out[i].confidence):
                out[i] = cand
    for i, m in enumerate(out):
        if not usable(m.mask):
            out[i] = PhotoMask(box_mask(images[i].size), 0.0, "box_fallback")
    return out
