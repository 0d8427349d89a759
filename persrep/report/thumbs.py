"""Small JPEG thumbnails for the report's galleries, written once into ``<report>/thumbs/``.

Each thumbnail is named by a hash of what it shows (source bytes + drawing), so re-writing a
report reuses the files already there and two identical thumbnails are one file. Drawings: a mask
outline, boxes (COCO ``[x, y, w, h]`` in source pixels), a coloured frame (correct / wrong).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SIDE = 128
GREEN, RED, BLUE, ORANGE = (24, 128, 56), (217, 48, 37), (26, 115, 232), (232, 113, 10)


def _outline(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    m = np.asarray(mask, dtype=bool)
    return m & ~ndimage.binary_erosion(m, iterations=2, border_value=0)  # 2 px: survives JPEG


class Thumbs:
    def __init__(self, out_dir: str | Path, side: int = SIDE, quality: int = 80):
        self.dir = Path(out_dir) / "thumbs"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.side, self.quality = side, quality
        self.written = 0

    def make(self, source: bytes | Image.Image | Callable[[], bytes | Image.Image], *,
             key: str | None = None, mask: np.ndarray | Callable[[], Any] | None = None,
             mask_color: tuple[int, int, int] = ORANGE,
             boxes: list[tuple[list[float], tuple[int, int, int]]] | None = None,
             frame: tuple[int, int, int] | None = None) -> str:
        """The thumbnail's path relative to the report directory (``thumbs/<hash>.jpg``).

        ``source`` (and ``mask``) may be callables, read only when the thumbnail is not on disk
        yet; then ``key`` must name the source (e.g. data set + image path) for the hash."""
        h = hashlib.sha1()
        if key is not None:
            h.update(key.encode())
        else:
            raw = source() if callable(source) else source
            h.update(raw if isinstance(raw, bytes) else np.asarray(raw).tobytes())
            source = raw
            if mask is not None and not callable(mask):
                h.update(np.packbits(np.asarray(mask, bool)).tobytes())
        h.update(json.dumps([mask_color, boxes, frame, self.side, mask is not None], default=str).encode())
        name = f"thumbs/{h.hexdigest()[:20]}.jpg"
        path = self.dir.parent / name
        if path.is_file():
            return name
        src = source() if callable(source) else source
        if callable(mask):
            mask = mask()
        img = Image.open(io.BytesIO(src)) if isinstance(src, bytes) else src
        img = img.convert("RGB")
        w0, h0 = img.size
        scale = self.side / max(w0, h0)
        size = (max(1, round(w0 * scale)), max(1, round(h0 * scale)))
        img = img.resize(size, Image.BILINEAR)
        if mask is not None:
            m = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255).resize(size, Image.NEAREST)
            edge = _outline(np.asarray(m) > 127)
            arr = np.asarray(img).copy()
            arr[edge] = mask_color
            img = Image.fromarray(arr)
        draw = ImageDraw.Draw(img)
        for box, color in boxes or []:
            if box:
                x, y, w, h = (float(v) * scale for v in box)
                draw.rectangle([x, y, x + w - 1, y + h - 1], outline=color, width=2)
        if frame is not None:
            draw.rectangle([0, 0, size[0] - 1, size[1] - 1], outline=frame, width=4)
        tmp = path.with_suffix(".tmp")
        img.save(tmp, format="JPEG", quality=self.quality, optimize=True)
        tmp.replace(path)
        self.written += 1
        return name
