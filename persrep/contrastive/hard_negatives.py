"""Hard negatives made from the instance's own images: identity-destroying edits, and context.

A user has three photos of one object and nothing about its look-alikes. The look-alikes that a
personalised model must reject (the same product in another flavour, a red pepper beside a green
one, the same mug in another colour) most often differ from it in colour. A copy of the object's
own photo with its hue turned far (at least ``min_hue_shift`` degrees, much more than lighting
moves it) is therefore a negative that shares everything else with the anchor: shape, texture,
context, framing. Training against it makes the features keep the colour identity that
contrastive training on generic negatives lets them drop.

Never drawn from other evaluated instances (docs/PROTOCOL.md, leakage): only the instance's own
images. Deterministic: the same sources, count and seed give the same images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from persrep.segmentation.base import as_bool_mask


def turn_hue(image: Image.Image, degrees: float) -> Image.Image:
    """``image`` with every pixel's hue turned by ``degrees`` (saturation and value kept)."""
    hsv = np.array(image.convert("RGB").convert("HSV"), dtype=np.int16)
    hsv[..., 0] = (hsv[..., 0] + round(degrees / 360.0 * 256)) % 256
    return Image.fromarray(hsv.astype(np.uint8), mode="HSV").convert("RGB")


def recoloured(sources: Sequence[Image.Image], count: int, min_shift: float, seed: int) -> list[Image.Image]:
    """``count`` recoloured copies of ``sources`` (cycled in a seeded order), each hue turned by a
    seeded angle in [min_shift, 360 - min_shift] degrees."""
    if count <= 0 or not sources:
        return []
    if not 0 < min_shift <= 180:
        raise ValueError(f"min_shift {min_shift}: need 0 < min_shift <= 180 degrees")
    rng = np.random.default_rng([seed, 0x4E6])
    order = rng.permutation(len(sources))
    out = []
    for i in range(count):
        src = sources[int(order[i % len(sources)])]
        out.append(turn_hue(src, float(rng.uniform(min_shift, 360.0 - min_shift))))
    return out


def erase_object(image: Image.Image, mask: Image.Image, grow: float = 0.04,
                 side: int = 256) -> tuple[Image.Image, np.ndarray]:
    """``image`` at most ``side`` px with its object gone, and where it was: the mask (grown by
    ``grow`` of the image's longer side, so the object's rim goes too) filled from the
    surroundings by OpenCV's inpainting."""
    import cv2

    img = image.convert("RGB")
    scale = min(1.0, side / max(img.size))
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    rgb = np.array(img.resize(size, Image.BILINEAR))
    hole = as_bool_mask(mask, size).astype(np.uint8)
    r = max(1, round(grow * max(size)))
    hole = cv2.dilate(hole, np.ones((2 * r + 1, 2 * r + 1), np.uint8))
    return Image.fromarray(cv2.inpaint(rgb, hole * 255, 5, cv2.INPAINT_TELEA)), hole.astype(bool)


def context_crops(photos: Sequence[Image.Image], masks: Sequence[Image.Image | None], count: int, seed: int,
                  area: tuple[float, float] = (0.1, 0.4), max_overlap: float = 0.15,
                  tries: int = 20) -> list[Image.Image]:
    """Up to ``count`` negatives showing where the object was photographed, without it: seeded crops
    of ``area`` of a photo, each placed where the object (its mask, grown: :func:`erase_object`)
    covers at most ``max_overlap`` of it, that little filled in. A draw of ``tries`` placements
    that finds no such place gives no crop (a photo the object fills has no context to show).

    They share the hand, the shelf, the table and the light with the anchors but not the object, so
    training against them pushes the context out of the features (a model that learnt "hand + shelf"
    scores every hand-held product high). A photo without a mask or with an empty one gives none."""
    if count <= 0:
        return []
    erased = [erase_object(photo, mask) for photo, mask in zip(photos, masks) if mask is not None]
    usable = [(img, hole) for img, hole in erased if hole.any()]
    if not usable:
        return []
    rng = np.random.default_rng([seed, 0xC0E7])
    out = []
    for i in range(count):
        img, hole = usable[i % len(usable)]
        for _ in range(tries):
            a = rng.uniform(*area) * img.width * img.height
            aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
            w = max(1, int(min(img.width, round(np.sqrt(a * aspect)))))
            h = max(1, int(min(img.height, round(np.sqrt(a / aspect)))))
            x = int(rng.integers(0, img.width - w + 1))
            y = int(rng.integers(0, img.height - h + 1))
            if hole[y:y + h, x:x + w].mean() <= max_overlap:
                out.append(img.crop((x, y, x + w, y + h)))
                break
    return out


def unlike_the_object(objects: np.ndarray, candidates: np.ndarray, unrelated: np.ndarray) -> np.ndarray:
    """Which context crops show no more of the object than an unrelated photo does.

    Rows are L2-normalised features (any model; training uses the model it starts from, before
    any step). A candidate's similarity is its highest cosine to the object's crops. It is kept
    when that is closer to the unrelated photos' (their mean highest cosine) than to the object's
    own (the mean cosine between two of its crops): a crop of a shelf, hand or table passes, a
    crop of the bin the fruit was picked from (more of the same fruit) or of the same product's
    other facings does not — such a "negative" would be the instance itself. One object crop:
    its own similarity counts as 1."""
    sim = lambda a: (a @ objects.T).max(axis=1) if len(a) else np.zeros(0)  # noqa: E731
    n = len(objects)
    own = 1.0 if n < 2 else float(((objects @ objects.T).sum() - n) / (n * (n - 1)))
    floor = float(sim(unrelated).mean()) if len(unrelated) else 0.0
    return sim(candidates) < 0.5 * (own + floor)
