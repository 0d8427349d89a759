"""Embed an image pool once per extractor, however many instances are evaluated against it.

:class:`EmbeddingCache` keys results by ``(kind, extractor_key, image_list_key)``:

- ``extractor_key`` names everything that determines the features: backbone, adapter key (or
  "pretrained"), global feature (``cls`` / ``cls+mean``), input size. The caller builds it;
  two different extractors must never share a key.
- ``image_list_key`` names the ordered image list (:func:`image_list_key` hashes the paths).

Results are kept in memory and, with a ``cache_dir``, as ``.npy`` files written under a
temporary name and renamed into place (atomic on one filesystem), so a crash never leaves a
truncated file that looks finished and a later process reuses finished files. Dense features
are stored L2-normalised per patch as float16 (every dense task normalises them anyway, and
unit vectors are safe in half precision) and are read back memory-mapped, so a large pool is
never fully loaded. ``.npy`` rather than safetensors: it memory-maps and streams batch by batch.

Size check: ViT-B/14 at 896 px gives 64 x 64 x 768 features, 6 MB per image in float16, so a
1,200-image dense pool is ~7.5 GB per extractor. Cache it for a shared (pretrained) backbone;
for a personalised backbone evaluated once, use :class:`StreamedDenseFeatures` instead, which
embeds batch by batch as the dense task walks the pool and keeps one batch in memory.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from persrep.evaluation.features import (FeatureExtractor, check_dense_output,
                                         check_global_output)
from persrep.hashing import sha256_hex

__all__ = ["ProgressCallback", "image_list_key", "EmbeddingCache", "StreamedDenseFeatures"]

# progress(what, done, total): what = "global:<image_list_key>" or "dense:<image_list_key>"
ProgressCallback = Callable[[str, int, int], None]


def image_list_key(names: Sequence[str]) -> str:
    """A stable key for an ordered list of image names/paths (order matters)."""
    digest = sha256_hex("\n".join(map(str, names)), 16)
    return f"{len(names)}-{digest}"


def _image_batch(images: Sequence, start: int, stop: int) -> torch.Tensor:
    items = []
    for i in range(start, stop):
        item = images[i]
        if isinstance(item, (tuple, list)):  # (image, label, ...) as torch datasets return
            item = item[0]
        if not isinstance(item, torch.Tensor) or item.ndim != 3:
            raise TypeError(f"image {i}: expected a [3, H, W] tensor, got "
                            f"{type(item).__name__}{tuple(getattr(item, 'shape', ()))}")
        items.append(item)
    return torch.stack(items)


class EmbeddingCache:
    """Global embeddings and dense features of image pools, computed once per key."""

    def __init__(self, cache_dir: str | os.PathLike | None = None, batch_size: int = 32,
                 progress: ProgressCallback | None = None, dense_dtype=np.float16):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.batch_size = batch_size
        self.progress = progress
        self.dense_dtype = np.dtype(dense_dtype)
        self._memory: dict[tuple[str, str, str], np.ndarray] = {}

    # -------------------------------------------------------------------------------------
    def _path(self, kind: str, extractor_key: str, list_key: str) -> Path | None:
        if self.cache_dir is None:
            return None
        digest = sha256_hex(f"{kind}\0{extractor_key}\0{list_key}", 24)
        return self.cache_dir / kind / f"{digest}.npy"

    def _load(self, key: tuple[str, str, str], n_images: int) -> np.ndarray | None:
        if key in self._memory:
            return self._memory[key]
        path = self._path(*key)
        if path is None or not path.exists():
            return None
        arr = np.load(path, mmap_mode="r")
        if arr.shape[0] != n_images:
            raise ValueError(f"cached {key[0]} features at {path} hold {arr.shape[0]} images, the "
                             f"list has {n_images}: the image_list_key does not name the list")
        self._memory[key] = arr
        return arr

    def _write_sidecar(self, path: Path, key: tuple[str, str, str], shape) -> None:
        meta = {"kind": key[0], "extractor_key": key[1], "image_list_key": key[2],
                "shape": list(shape)}
        tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex}.json")
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, path.with_suffix(".json"))

    def _compute(self, key, images: Sequence, embed: Callable[[torch.Tensor], np.ndarray],
                 dtype: np.dtype) -> np.ndarray:
        n, path = len(images), self._path(*key)
        what = f"{key[0]}:{key[2]}"
        out, tmp = None, None
        try:
            for start in range(0, n, self.batch_size):
                stop = min(start + self.batch_size, n)
                batch = embed(_image_batch(images, start, stop))
                if out is None:
                    shape = (n, *batch.shape[1:])
                    if path is None:
                        out = np.empty(shape, dtype=dtype)
                    else:
                        path.parent.mkdir(parents=True, exist_ok=True)
                        tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex}.npy")
                        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
                out[start:stop] = batch
                if self.progress is not None:
                    self.progress(what, stop, n)
            if out is None:
                raise ValueError(f"cannot embed an empty image list ({what})")
            if tmp is not None:
                out.flush()
                del out
                os.replace(tmp, path)  # publish only a complete file
                tmp = None
                self._write_sidecar(path, key, np.load(path, mmap_mode="r").shape)
                out = np.load(path, mmap_mode="r")
        finally:
            if tmp is not None and tmp.exists():
                tmp.unlink()
        self._memory[key] = out
        return out

    # -------------------------------------------------------------------------------------
    def global_embeddings(self, extractor: FeatureExtractor, extractor_key: str,
                          images: Sequence, list_key: str) -> np.ndarray:
        """``[N, D]`` float32 global embeddings of ``images`` (``[3, H, W]`` tensors)."""
        key = ("global", extractor_key, list_key)
        cached = self._load(key, len(images))
        if cached is not None:
            return cached

        def embed(batch: torch.Tensor) -> np.ndarray:
            with torch.inference_mode():
                out = extractor.global_features(batch)
            check_global_output(out, len(batch))
            return out.detach().float().cpu().numpy()

        return self._compute(key, images, embed, np.dtype(np.float32))

    def dense_features(self, extractor: FeatureExtractor, extractor_key: str,
                       images: Sequence, list_key: str) -> np.ndarray:
        """``[N, D, h, w]`` L2-normalised (per patch) dense features, memory-mapped with a cache dir."""
        key = ("dense", extractor_key, list_key)
        cached = self._load(key, len(images))
        if cached is not None:
            return cached

        def embed(batch: torch.Tensor) -> np.ndarray:
            with torch.inference_mode():
                out = extractor.dense_features(batch)
            check_dense_output(out, len(batch))
            out = torch.nn.functional.normalize(out.detach().float(), dim=1)
            return out.cpu().numpy()

        return self._compute(key, images, embed, self.dense_dtype)

    def arrays(self, kind: str, extractor_key: str, images: Sequence, list_key: str,
               embed: Callable[[torch.Tensor], np.ndarray], dtype=np.float32) -> np.ndarray:
        """Any per-image array (``embed``: batch -> numpy), cached like the embeddings under its
        own ``kind`` (``persrep.evaluation.prefix_pool``: a frozen prefix's activations)."""
        key = (kind, extractor_key, list_key)
        cached = self._load(key, len(images))
        return cached if cached is not None else self._compute(key, images, embed, np.dtype(dtype))

    def forget(self, extractor_key: str) -> None:
        """Drop one extractor's arrays from memory (files on disk stay)."""
        for key in [k for k in self._memory if k[1] == extractor_key]:
            del self._memory[key]


class StreamedDenseFeatures:
    """A read-once view of a pool's dense features, embedded one batch at a time on access.

    Sequential access (what the dense task does) embeds each batch exactly once; features are
    L2-normalised per patch like the cached ones.
    """

    def __init__(self, extractor: FeatureExtractor, images: Sequence, batch_size: int = 8):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.extractor, self.images, self.batch_size = extractor, images, batch_size
        self._start, self._batch = -1, None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < len(self.images):
            raise IndexError(f"image {index} outside a pool of {len(self.images)}")
        start = index - index % self.batch_size
        if start != self._start:
            batch = _image_batch(self.images, start, min(start + self.batch_size, len(self)))
            with torch.inference_mode():
                out = self.extractor.dense_features(batch)
            check_dense_output(out, len(batch))
            self._batch = torch.nn.functional.normalize(out.detach().float(), dim=1).cpu().numpy()
            self._start = start
        return self._batch[index - start]
