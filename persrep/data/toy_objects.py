"""Toy-world objects: what an instance looks like and its sprite in canonical pose.

A category is a silhouette with one dominant colour family; its instances differ only in fine
detail: a surface pattern (stripes, dots, checker, an emblem glyph, ...) and accent colours. That
detail is what tells instances apart, so category-level features cannot.
"""

from __future__ import annotations

import colorsys
import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES = ("mug", "bottle", "ball", "box", "lamp", "shoe", "star", "house")
PATTERNS = ("stripes", "dots", "checker", "emblem", "zigzag", "rings", "diagonal", "grid")
_HUES = dict(mug=0.0, bottle=0.33, ball=0.61, box=0.08, lamp=0.14, shoe=0.78, star=0.5, house=0.9)
_LOOK_STREAM = 5  # numpy seed-sequence stream of instance looks (other streams: persrep.data.toy)
RGB = tuple[int, int, int]


def hsv(h: float, s: float, v: float) -> RGB:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0), 1), min(max(v, 0), 1))
    return (round(r * 255), round(g * 255), round(b * 255))


def seeded_rng(seed: int, *stream: int) -> np.random.Generator:
    """A generator for one stream of one seed (any Python int, negative included)."""
    return np.random.default_rng([seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, *stream])


@dataclass(frozen=True)
class Look:
    """What one instance looks like: the category's silhouette and colour, its own detail."""

    category: str
    body: RGB
    trim: RGB  # category-wide darker shade for secondary parts (roof, stem, side face)
    accent: RGB  # pattern colour
    accent2: RGB  # small detail (cap, sole, base, tape)
    pattern: str
    period: float  # pattern period as a fraction of the sprite side
    phase: float
    glyph: int


def instance_look(seed: int, category_index: int, key: int) -> Look:
    """The look of instance ``key`` of a category; the pattern kind cycles with the key so that
    the evaluated instances of a category (keys 0, 1, ...) never share one until the 9th."""
    rng = seeded_rng(seed, _LOOK_STREAM, category_index, key)
    name, hue = CATEGORIES[category_index], _HUES[CATEGORIES[category_index]]
    accent_hue = hue + rng.uniform(0.2, 0.8)  # keep the pattern off the body's hue so it shows
    accent_value = rng.uniform(0.1, 0.3) if rng.random() < 0.5 else rng.uniform(0.9, 1.0)
    return Look(
        category=name,
        body=hsv(hue + rng.uniform(-0.02, 0.02), rng.uniform(0.55, 0.7), rng.uniform(0.68, 0.8)),
        trim=hsv(hue, 0.55, 0.42),
        accent=hsv(accent_hue, rng.uniform(0.2, 0.6), accent_value),
        accent2=hsv(rng.random(), rng.uniform(0.3, 0.9), rng.uniform(0.3, 1.0)),
        pattern=PATTERNS[(key + 3 * category_index) % len(PATTERNS)],
        period=float(rng.uniform(0.09, 0.14)), phase=float(rng.random()),
        glyph=int(rng.integers(6)))


def _draw_pattern(look: Look, size: int, box: tuple[int, int, int, int]) -> Image.Image:
    """A body-coloured square carrying the instance's pattern; ``box`` bounds the body."""
    image = Image.new("RGB", (size, size), look.body)
    d, p, c = ImageDraw.Draw(image), look.period * size, look.accent
    x0, y0, x1, y1 = box
    cx, cy, off = (x0 + x1) / 2, (y0 + y1) / 2, look.phase * p
    steps = np.arange(-2 * size, 2 * size, p) + off
    w = max(1, round(0.4 * p))
    if look.pattern == "stripes":
        for y in steps:
            d.rectangle([0, y, size, y + 0.45 * p], fill=c)
    elif look.pattern == "diagonal":
        for t in steps:
            d.line([(t, 0), (t + size, size)], fill=c, width=w)
    elif look.pattern == "grid":
        for t in steps:
            d.line([(t, 0), (t, size)], fill=c, width=max(1, w // 2))
            d.line([(0, t), (size, t)], fill=c, width=max(1, w // 2))
    elif look.pattern == "dots":
        for row, y in enumerate(steps):
            for x in steps + (p / 2 if row % 2 else 0):
                d.ellipse([x - 0.25 * p, y - 0.25 * p, x + 0.25 * p, y + 0.25 * p], fill=c)
    elif look.pattern == "checker":
        cell = 0.7 * p
        for i, y in enumerate(np.arange(y0 - off, y1, cell)):
            for j, x in enumerate(np.arange(x0 - off, x1, cell)):
                if (i + j) % 2:
                    d.rectangle([x, y, x + cell, y + cell], fill=c)
    elif look.pattern == "zigzag":
        for y in steps[::2]:
            xs = np.arange(0, size + p, p / 2)
            points = [(x, y + (0.3 * p if k % 2 else -0.3 * p)) for k, x in enumerate(xs)]
            d.line(points, fill=c, width=w)
    elif look.pattern == "rings":
        for r in np.arange(0.3 * p + off / 2, size, 1.1 * p):
            d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=c, width=w)
    else:  # emblem: one glyph on the front, like a printed logo
        r = 0.3 * min(x1 - x0, y1 - y0)
        if look.glyph == 0:
            d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=c, width=max(1, round(r / 3)))
        elif look.glyph == 1:
            d.regular_polygon((cx, cy, r), 3, fill=c)
        elif look.glyph == 2:
            d.rectangle([cx - r, cy - r / 3, cx + r, cy + r / 3], fill=c)
            d.rectangle([cx - r / 3, cy - r, cx + r / 3, cy + r], fill=c)
        elif look.glyph == 3:
            d.regular_polygon((cx, cy, r), 4, fill=c)
        elif look.glyph == 4:
            d.polygon(_star_outline(cx, cy, r, 0.45 * r), fill=c)
        else:
            d.regular_polygon((cx, cy, r), 6, fill=c, rotation=30)
            d.regular_polygon((cx, cy, r / 2), 6, fill=look.body, rotation=30)
    return image


def _star_outline(cx: float, cy: float, outer: float, inner: float) -> tuple[float, ...]:
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, outer, inner)
    return tuple(np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1).ravel())


# Each category's parts: (layer, PIL draw method, unit coordinates, colour, size-relative options).
# Layers are drawn "under", then "body" (the region the pattern fills), then "top"; a colour names
# a Look field or a shade of the body. Only the body and the small accent2 part vary by instance.
_PARTS = {
    "mug": [("under", "ellipse", (0.56, 0.34, 0.93, 0.75), "outline:body", dict(width=0.075)),
            ("body", "rounded_rectangle", (0.14, 0.2, 0.7, 0.9), "", dict(radius=0.06)),
            ("top", "ellipse", (0.14, 0.13, 0.7, 0.27), "trim", {}),
            ("top", "ellipse", (0.18, 0.155, 0.66, 0.245), "dark", {})],
    "bottle": [("body", "rounded_rectangle", (0.28, 0.38, 0.72, 0.96), "", dict(radius=0.09)),
               ("body", "ellipse", (0.28, 0.27, 0.72, 0.5), "", {}),
               ("top", "rectangle", (0.41, 0.11, 0.59, 0.3), "body", {}),
               ("top", "rounded_rectangle", (0.38, 0.03, 0.62, 0.13), "accent2",
                dict(radius=0.02))],
    "ball": [("body", "ellipse", (0.08, 0.08, 0.92, 0.92), "", {}),
             ("top", "ellipse", (0.26, 0.2, 0.38, 0.3), "light", {})],
    "box": [("under", "polygon", (0.1, 0.36, 0.64, 0.36, 0.9, 0.12, 0.36, 0.12), "lighter", {}),
            ("under", "polygon", (0.64, 0.36, 0.9, 0.12, 0.9, 0.68, 0.64, 0.92), "trim", {}),
            ("body", "rectangle", (0.1, 0.36, 0.64, 0.92), "", {}),
            ("top", "line", (0.23, 0.36, 0.5, 0.12), "accent2", dict(width=0.05))],
    "lamp": [("under", "rectangle", (0.45, 0.48, 0.55, 0.86), "trim", {}),
             ("body", "polygon", (0.28, 0.05, 0.72, 0.05, 0.92, 0.52, 0.08, 0.52), "", {}),
             ("top", "ellipse", (0.22, 0.8, 0.78, 0.95), "accent2", {})],
    "shoe": [("body", "polygon", (0.08, 0.76, 0.1, 0.26, 0.36, 0.24, 0.44, 0.44, 0.72, 0.5,
                                  0.9, 0.58, 0.95, 0.76), "", {}),
             ("body", "ellipse", (0.7, 0.48, 0.97, 0.8), "", {}),
             ("top", "rounded_rectangle", (0.05, 0.74, 0.98, 0.86), "accent2", dict(radius=0.04)),
             ("top", "line", (0.37, 0.32, 0.47, 0.28), "trim", dict(width=0.025)),
             ("top", "line", (0.4, 0.4, 0.52, 0.36), "trim", dict(width=0.025))],
    "star": [("body", "polygon", _star_outline(0.5, 0.53, 0.47, 0.24), "", {})],
    "house": [("under", "rectangle", (0.66, 0.12, 0.76, 0.36), "trim", {}),
              ("body", "rectangle", (0.18, 0.46, 0.82, 0.93), "", {}),
              ("top", "polygon", (0.06, 0.5, 0.5, 0.1, 0.94, 0.5), "trim", {}),
              ("top", "rectangle", (0.43, 0.68, 0.57, 0.93), "accent2", {})],
}


def _part_colour(look: Look, name: str) -> RGB:
    shades = {"dark": 0.45, "lighter": 1.25, "light": 1.6}
    if name in shades:
        return tuple(min(255, int(shades[name] * c)) for c in look.body)
    return getattr(look, name)


def _draw_parts(look: Look, layer: str, draw: ImageDraw.ImageDraw, size: int) -> None:
    for where, method, coords, colour, options in _PARTS[look.category]:
        if where != layer:
            continue
        kwargs = {key: round(value * size) for key, value in options.items()}
        if layer == "body":
            kwargs["fill"] = 255  # the body layer is a mask
        elif colour.startswith("outline:"):
            kwargs["outline"] = _part_colour(look, colour.split(":")[1])
        else:
            kwargs["fill"] = _part_colour(look, colour)
        getattr(draw, method)([c * size for c in coords], **kwargs)


@functools.lru_cache(maxsize=48)
def render_sprite(look: Look, size: int) -> Image.Image:
    """The instance in canonical pose on a transparent square, premultiplied ("RGBa") so that
    resampling never bleeds the transparent colour into the object's edge."""
    canvas = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    body_mask = Image.new("L", (size, size), 0)
    _draw_parts(look, "under", ImageDraw.Draw(canvas), size)
    _draw_parts(look, "body", ImageDraw.Draw(body_mask), size)
    canvas.paste(_draw_pattern(look, size, body_mask.getbbox()), (0, 0), body_mask)
    _draw_parts(look, "top", ImageDraw.Draw(canvas), size)
    # cylindrical shading: a simple cue of volume, brighter left of centre
    x = np.linspace(0, 1, size)
    shade = 0.78 + 0.3 * np.sin(np.pi * np.clip(x + 0.12, 0, 1))
    pixels = np.asarray(canvas).astype(np.float32)
    pixels[..., :3] = np.clip(pixels[..., :3] * shade[None, :, None], 0, 255)
    return Image.fromarray(pixels.astype(np.uint8), "RGBA").convert("RGBa")
