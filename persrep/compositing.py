"""Cut-and-paste geometry and compositing: one masked foreground pasted onto a background.

Used by the ``cut_paste`` generator (:mod:`persrep.generation.cut_paste`) and by
``persrep data composite`` (:mod:`persrep.data.composite`); numpy + PIL only, below both layers.
Also the crop of a photo to its mask's box (:func:`mask_box_crop`), which synthesis filtering and
the context negatives of training share.

Geometry, all drawn from ``np.random.default_rng(row.seed)`` (so a row regenerates alone):

- *scale* (``generator.cut_paste.scale_range``): the object's longer side, before rotation, as a
  fraction of the background's shorter side.
- *rotation*: uniform in ``±rotation_degrees``; *flip*: horizontal, probability 1/2 when ``flip``.
- *position*: uniform over the offsets that keep the object inside the canvas. With a scale near
  or above 1 the object can be larger than the canvas along an axis; then the offset is uniform
  over the positions where the object covers that axis (the object is cropped, the mask too).

Blending (edge_blur, in pixels = Gaussian sigma): the emitted mask is ``alpha >= 0.5`` of the
transformed foreground. Outside the mask the output equals the background byte for byte. Inside
it, the foreground weight is the Gaussian-blurred mask clipped to [0.5, 1]: 1 in the object's
interior (the photo's pixels exactly), fading to >= 0.5 on the mask's inner rim. So the mask is
exactly the set of changed pixels (wherever foreground and background differ by 2 or more), and
the seam is still softened. Resizing and rotation work on premultiplied alpha, so no dark fringe
leaks in from outside the object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

ALPHA_THRESHOLD = 128  # mask = alpha >= 0.5 after resizing and rotation
MIN_INNER_WEIGHT = 0.5  # foreground weight on the mask's inner rim (keeps mask == changed pixels)
MIN_OBJECT_PX = 4  # a smaller paste is no longer recognisably the object


@dataclass(frozen=True)
class Placement:
    """Where and how one foreground is pasted; a pure function of the row's seed."""

    background_seed: int
    scale: float
    angle: float  # degrees, counter-clockwise
    flip: bool
    x_fraction: float  # position within the allowed offset range, 0..1
    y_fraction: float


def draw_placement(seed: int, cut_paste: Any) -> Placement:
    """Draw a placement from ``default_rng(seed)``. Every value is always drawn, in a fixed order,
    so changing one setting (e.g. the scale range) leaves the other draws of a seed unchanged."""
    rng = np.random.default_rng(seed)
    background_seed = int(rng.integers(0, 2**31 - 1))
    lo, hi = cut_paste.scale_range
    scale = float(rng.uniform(lo, hi))
    angle = float(rng.uniform(-cut_paste.rotation_degrees, cut_paste.rotation_degrees))
    flip = bool(rng.random() < 0.5) and bool(cut_paste.flip)
    x_fraction, y_fraction = (float(v) for v in rng.random(2))
    return Placement(background_seed, scale, angle, flip, x_fraction, y_fraction)


def mask_box_crop(image: Image.Image, mask: Image.Image | None) -> Image.Image:
    """``image`` (RGB) cropped to the box of ``mask > 0``; the whole image without a usable mask."""
    image = image.convert("RGB")
    if mask is None:
        return image
    solid = mask.convert("L")
    if solid.size != image.size:
        solid = solid.resize(image.size, Image.Resampling.NEAREST)
    box = solid.point(lambda v: 255 if v > 0 else 0).getbbox()
    return image.crop(box) if box else image


def cut_out(image: Image.Image, mask: Image.Image, where: str) -> Image.Image:
    """The masked object, cropped to its mask box, as premultiplied RGBa (mask = alpha)."""
    solid = mask.convert("L").point(lambda v: 255 if v > 0 else 0)
    box = solid.getbbox()
    if box is None:
        raise ValueError(f"{where}: the mask is empty (no foreground pixel): fix the train_masks/ file")
    rgba = image.convert("RGB")
    rgba.putalpha(solid)
    return rgba.crop(box).convert("RGBa")


def transform_foreground(cutout: Image.Image, placement: Placement, canvas: int) -> tuple[np.ndarray, np.ndarray]:
    """Flip, scale, rotate a cut-out; returns (colour HxWx3 uint8, solid HxW bool) cropped to the object."""
    fg = cutout.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if placement.flip else cutout
    factor = max(MIN_OBJECT_PX, placement.scale * canvas) / max(fg.size)
    size = (max(1, round(fg.width * factor)), max(1, round(fg.height * factor)))
    fg = fg.resize(size, Image.Resampling.BILINEAR)
    if placement.angle:
        fg = fg.rotate(placement.angle, resample=Image.Resampling.BILINEAR, expand=True)
    rgba = np.asarray(fg.convert("RGBA"))
    solid = rgba[..., 3] >= ALPHA_THRESHOLD
    if not solid.any():  # a hair-thin object shrunk below half a pixel: keep what is left of it
        solid = rgba[..., 3] > 0
    rows, cols = np.flatnonzero(solid.any(axis=1)), np.flatnonzero(solid.any(axis=0))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    return rgba[top:bottom, left:right, :3], solid[top:bottom, left:right]


def composite(background: Image.Image, colour: np.ndarray, solid: np.ndarray, x_fraction: float,
              y_fraction: float, edge_blur: float) -> tuple[Image.Image, Image.Image]:
    """Paste ``colour`` where ``solid`` onto ``background``; returns (image, mask L 0/255).

    Pixels outside the returned mask are the background's exactly; see the module docstring.
    """
    bg = np.asarray(background.convert("RGB"), dtype=np.float32)
    canvas_h, canvas_w = bg.shape[:2]
    h, w = solid.shape
    # uniform over [0, canvas - size]; negative range when the object is larger than the canvas
    x0, y0 = round(x_fraction * (canvas_w - w)), round(y_fraction * (canvas_h - h))
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x0 + w, canvas_w), min(y0 + h, canvas_h)
    mask = np.zeros((canvas_h, canvas_w), dtype=bool)
    fg = np.zeros_like(bg)
    mask[cy0:cy1, cx0:cx1] = solid[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
    fg[cy0:cy1, cx0:cx1] = colour[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
    mask_image = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
    weight = mask.astype(np.float32)
    if edge_blur > 0:
        soft = np.asarray(mask_image.filter(ImageFilter.GaussianBlur(edge_blur)), dtype=np.float32) / 255
        weight = np.where(mask, np.clip(soft, MIN_INNER_WEIGHT, 1.0), 0.0).astype(np.float32)
    weight = weight[..., None]
    out = np.rint(bg * (1 - weight) + fg * weight).clip(0, 255).astype(np.uint8)
    return Image.fromarray(out, mode="RGB"), mask_image
