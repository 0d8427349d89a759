"""GrabCut (OpenCV): object masks with no segmentation weights, for machines without SAM.

Initialisation (``segmentation.init``):

- ``box``: a centred rectangle, ``margin`` of the width/height cut off each side (outside =
  background). Good when the object fills the middle of the frame on a plain background.
- ``prior`` (default): a per-pixel object prior from the real offline EfficientNet-Lite0's last
  feature map (320 px input, a 10 x 10 grid). Without a reference the prior is *distinctiveness
  from the frame*: 1 - similarity of each cell to its most similar border cells (the border is
  assumed background), times a mild centre weight. With a reference (the instance's train images
  and masks), it is similarity to the object's own foreground features minus similarity to their
  backgrounds. Inside the box the prior's upper half starts as probable foreground, the rest as
  probable background, so GrabCut's colour models start from the object instead of the box.
- ``auto``: both, keeping the mask with the higher confidence (twice the time).

A start that finds nothing (an empty mask) is retried with the other start.

Post-processing: largest connected component, holes filled, mask upsampled (bilinear, 0.5) to
the photo's size. Confidence in [0, 1]: how well the final mask's colour histograms separate
foreground from background (mean posterior agreement, rescaled from [0.5, 1]) times the share of
the frame border the mask leaves free; 0 for empty or nearly whole-frame masks.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from persrep.errors import SegmenterUnavailableError
from persrep.segmentation.base import (Needs, Reference, Segmentation, Segmenter, border_fraction,
                                       clean_mask, register_segmenter)

PRIOR_INPUT = 320  # EfficientNet-Lite0 input for the prior: a 10 x 10 feature grid
PRIOR_FG = 0.1  # normalised prior above this starts as probable foreground (inside the box);
# 0.5 lost the object on COIL (IoU 0.39: objects fill the frame, the 10x10 prior is blurred), 0.1 gave 0.73


@register_segmenter
class GrabCutSegmenter(Segmenter):
    name = "grabcut"
    needs = Needs(weights=False, gpu_preferred=False, reference=False)

    @classmethod
    def preflight(cls, settings: Any) -> str:
        try:
            import cv2  # noqa: F401
        except ImportError:
            raise SegmenterUnavailableError(
                "segmenter grabcut: opencv is not installed: `pip install opencv-python-headless`") from None
        return super().preflight(settings)

    def identity(self) -> dict[str, Any]:
        s = self.settings
        return {"segmenter": self.name, "init": s.init, "margin": s.margin, "iterations": s.iterations,
                "max_side": s.max_side, "prior_input": PRIOR_INPUT if s.init != "box" else None}

    def segment(self, images: list[Image.Image], reference: Reference | None = None) -> list[Segmentation]:
        images = [i.convert("RGB") for i in images]
        init = self.settings.init
        priors = feature_priors(images, reference) if init in ("prior", "auto") and images else [None] * len(images)
        if init != "auto":
            out = [self._one(img, prior) for img, prior in zip(images, priors)]
            for i, seg in enumerate(out):  # nothing found: try the other start before giving up
                if not seg.mask.any():
                    other = None if init == "prior" else feature_priors([images[i]], reference)[0]
                    out[i] = max(seg, self._one(images[i], other), key=lambda s: (s.mask.any(), s.confidence))
            return out
        # auto: both starts, keep the more confident mask (the confidence decides, not the data set)
        return [max(self._one(img, prior), self._one(img, None), key=lambda s: s.confidence)
                for img, prior in zip(images, priors)]

    def refine(self, images: list[Image.Image], reference: Reference) -> list[Segmentation]:
        """Started from the reference's feature prior (the object's own foreground features minus
        its backgrounds), whatever ``init`` says; the centred box when that finds nothing."""
        images = [i.convert("RGB") for i in images]
        out = []
        for img, prior in zip(images, feature_priors(images, reference)):
            seg = self._one(img, prior)
            out.append(seg if seg.mask.any() else self._one(img, None))
        return out

    def _one(self, image: Image.Image, prior: np.ndarray | None) -> Segmentation:
        import cv2

        s = self.settings
        full = np.asarray(image)
        scale = min(1.0, s.max_side / max(image.size))
        arr = full if scale == 1.0 else cv2.resize(
            full, (max(8, round(image.width * scale)), max(8, round(image.height * scale))),
            interpolation=cv2.INTER_AREA)
        h, w = arr.shape[:2]
        mx, my = max(1, round(s.margin * w)), max(1, round(s.margin * h))
        rect = (mx, my, max(1, w - 2 * mx), max(1, h - 2 * my))
        bgr = np.ascontiguousarray(arr[:, :, ::-1])
        gc = np.zeros((h, w), np.uint8)
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        init_mask = self._prior_mask(prior, rect, h, w) if prior is not None else None
        # GrabCut seeds its colour models with k-means on OpenCV's (per-thread) RNG: reseed, so a
        # mask depends on the photo alone, not on what this worker segmented before
        cv2.setRNGSeed(0)
        try:
            if init_mask is not None:
                gc = init_mask
                cv2.grabCut(bgr, gc, None, bgd, fgd, s.iterations, cv2.GC_INIT_WITH_MASK)
            else:
                cv2.grabCut(bgr, gc, rect, bgd, fgd, s.iterations, cv2.GC_INIT_WITH_RECT)
        except cv2.error:  # degenerate colour models (e.g. a flat image): no object found
            gc[:] = cv2.GC_BGD
        small = clean_mask((gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD))
        mask = small
        if small.shape != full.shape[:2]:
            up = cv2.resize(small.astype(np.float32), (image.width, image.height), interpolation=cv2.INTER_LINEAR)
            mask = clean_mask(up >= 0.5)
        return Segmentation(mask, colour_confidence(arr, small))

    @staticmethod
    def _prior_mask(prior: np.ndarray, rect: tuple[int, int, int, int], h: int, w: int) -> np.ndarray | None:
        import cv2

        p = cv2.resize(prior.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
        x, y, rw, rh = rect
        gc = np.full((h, w), cv2.GC_BGD, np.uint8)
        inside = np.zeros((h, w), bool)
        inside[y:y + rh, x:x + rw] = True
        lo, hi = float(p[inside].min()), float(p[inside].max())
        if hi - lo < 1e-6:
            return None
        pn = (p - lo) / (hi - lo)
        gc[inside & (pn >= PRIOR_FG)] = cv2.GC_PR_FGD
        gc[inside & (pn < PRIOR_FG)] = cv2.GC_PR_BGD
        fg, bg = gc == cv2.GC_PR_FGD, gc != cv2.GC_PR_FGD
        if fg.sum() < 16 or bg.sum() < 16:
            return None
        return gc


def colour_confidence(arr: np.ndarray, mask: np.ndarray) -> float:
    """[0, 1]: colour separability of ``mask`` in ``arr`` (RGB uint8) x free share of the border."""
    n = mask.size
    area = mask.sum()
    if area < max(4, 0.001 * n) or area > 0.95 * n:
        return 0.0
    q = (arr.astype(np.int32) // 32)
    idx = (q[..., 0] * 64 + q[..., 1] * 8 + q[..., 2]).ravel()
    m = mask.ravel()
    hf = np.bincount(idx[m], minlength=512) + 1.0
    hb = np.bincount(idx[~m], minlength=512) + 1.0
    lf, lb = hf / hf.sum(), hb / hb.sum()  # colour likelihoods under each model
    pf = lf[idx] / (lf[idx] + lb[idx])
    agree = float(np.where(m, pf, 1.0 - pf).mean())
    return float(np.clip((agree - 0.5) * 2.0, 0.0, 1.0) * (1.0 - border_fraction(mask)))


# -- the feature prior ---------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _prior_backbone() -> tuple[Any, Any]:
    from persrep.config import BackboneSettings
    from persrep.models.backbones import build_backbone, eval_transform

    bs = BackboneSettings(name="tf_efficientnet_lite0", weights="offline", image_size=PRIOR_INPUT)
    return build_backbone(bs).eval(), eval_transform(bs, center_crop=False)


def dense_grid(images: list[Image.Image]) -> torch.Tensor:
    """L2-normalised last-layer features ``[N, D, g, g]`` of the offline EfficientNet-Lite0."""
    model, transform = _prior_backbone()
    with torch.no_grad():
        fmap = model.dense_features(torch.stack([transform(i) for i in images]))
    return F.normalize(fmap.float(), dim=1)


def feature_priors(images: list[Image.Image], reference: Reference | None = None) -> list[np.ndarray]:
    """One prior map per image on the feature grid (higher = more likely the object)."""
    feats = dense_grid(images)  # [N, D, g, g]
    n, d, g, _ = feats.shape
    cells = feats.flatten(2).transpose(1, 2)  # [N, g*g, D]
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, g), torch.linspace(-1, 1, g), indexing="ij")
    centre = torch.exp(-(xx ** 2 + yy ** 2) / (2 * 0.6 ** 2)).flatten()  # mild: objects are centred
    if reference is not None:
        rf = dense_grid(reference.images).flatten(2).transpose(1, 2).reshape(-1, d)
        rm = torch.cat([F.adaptive_avg_pool2d(torch.from_numpy(m.astype(np.float32))[None, None], g).flatten()
                        for m in reference.masks])
        fg, bg = rf[rm >= 0.5], rf[rm < 0.2]
        if len(fg) and len(bg):
            fproto, bproto = F.normalize(fg.mean(0), dim=0), F.normalize(bg.mean(0), dim=0)
            prior = cells @ fproto - cells @ bproto  # [N, g*g]
            return [p.reshape(g, g).numpy() for p in prior]
    border = torch.zeros(g, g, dtype=torch.bool)
    border[0], border[-1], border[:, 0], border[:, -1] = True, True, True, True
    bcells = cells[:, border.flatten()]  # [N, B, D]
    sim = cells @ bcells.transpose(1, 2)  # [N, g*g, B]
    k = min(3, sim.shape[-1])
    distinct = 1.0 - sim.topk(k, dim=-1).values.mean(-1)  # far from the frame's content
    return [(p * centre).reshape(g, g).numpy() for p in distinct]
