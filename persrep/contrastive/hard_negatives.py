"""Hard negatives made from the instance's own images: identity-destroying edits.

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
