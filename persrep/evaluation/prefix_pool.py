"""Evaluation through a frozen prefix: embed each pool's shared layers once, each adapter's tail only.

An adapter changes only the layers LoRA touches (``persrep.models.prefix``). For a CNN whose
adapters start at ``blocks.<split>``, the stem and ``blocks[:split]`` give every model the same
activations, so :func:`prefix_activations` computes them once per (base backbone, input
transform, image list, split) and keeps them in this process (a Ray worker keeps them across
the evaluation units it runs; ``LocalExecutor`` across the whole stage). :class:`TailExtractor`
is a :class:`~persrep.evaluation.features.FeatureExtractor` whose "images" are those
activations: it runs only ``blocks[split:]`` + head. Same layers in the same order on the same
batches as the full forward: the features match to float rounding (tests/test_prefix_cache.py
states the tolerance and that the metrics are identical).

The hypercolumn's stride-16 half is ``blocks.4``'s output, which is the prefix output itself
when LoRA starts at ``blocks.5`` (the default): the pretrained part is reused, not recomputed.

Setting: ``evaluation.prefix_cache`` (default true; false = the full forward per model, the
baseline of ``bench/per_instance.py``). Memory: float32 activations, e.g. EfficientNet-Lite0 at
160 px ~ 45 KB per image, at 448 px (dense) ~ 350 KB; at most :data:`MAX_ENTRIES` pools are kept.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch

from persrep.config import content_key
from persrep.evaluation.cache import EmbeddingCache
from persrep.models.prefix import (global_from_map, hypercolumn, hypercolumn_block, prefix_split,
                                   run_prefix, run_tail)

MAX_ENTRIES = 6  # pools (global test, gallery, dense test, dense gallery, ... ) kept per process


class _BoundedCache(EmbeddingCache):
    """The process's prefix activations, oldest pools dropped first."""

    def _compute(self, key, images, embed, dtype):  # noqa: D401 - EmbeddingCache hook
        out = super()._compute(key, images, embed, dtype)
        self._memory = OrderedDict(self._memory)
        while len(self._memory) > MAX_ENTRIES:
            self._memory.popitem(last=False)
        return out


_PROCESS_CACHE: _BoundedCache | None = None


def process_cache(batch_size: int) -> EmbeddingCache:
    global _PROCESS_CACHE
    if _PROCESS_CACHE is None or _PROCESS_CACHE.batch_size != batch_size:
        _PROCESS_CACHE = _BoundedCache(None, batch_size=batch_size)
    return _PROCESS_CACHE


def clear_process_cache() -> None:
    global _PROCESS_CACHE
    _PROCESS_CACHE = None


class Activations(Sequence):
    """Rows of a cached activation array as ``[C, h, w]`` tensors (what the embedders batch)."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, i: int) -> torch.Tensor:  # type: ignore[override]
        return torch.from_numpy(np.asarray(self.array[i]))


class TailExtractor:
    """Global and dense features of a (personalised) CNN from its prefix activations."""

    def __init__(self, backbone, split: int, feature: str, dense: str):
        self.backbone, self.split, self.feature, self.dense = backbone, split, feature, dense
        self.keep = hypercolumn_block(backbone) if dense == "hypercolumn" else None

    def _on_device(self, h: torch.Tensor) -> torch.Tensor:
        return h.to(next(self.backbone.parameters()).device)

    def global_features(self, h: torch.Tensor) -> torch.Tensor:
        fmap, _ = run_tail(self.backbone, self._on_device(h), self.split)
        return global_from_map(fmap, self.feature)

    def dense_features(self, h: torch.Tensor) -> torch.Tensor:
        fmap, mid = run_tail(self.backbone, self._on_device(h), self.split, self.keep)
        return fmap if self.dense == "last" else hypercolumn(mid, fmap)


def usable_split(backbone, dense: str, targets=None) -> int | None:
    """The prefix split for this backbone, or None when the cached path cannot be exact."""
    split = prefix_split(backbone, targets)
    if split is None:
        return None
    if dense == "hypercolumn":
        keep = hypercolumn_block(backbone)
        if keep is None or keep < split - 1:  # the stride-16 map would sit inside the prefix
            return None
    return split


def prefix_activations(base, split: int, images: Sequence, list_key: str, transform_key: str,
                       batch_size: int) -> Activations:
    """``blocks[:split]`` activations of ``images`` (transformed ``[3, H, W]`` tensors), computed
    once per process for (base identity, transform, list, split)."""
    key = content_key("prefix", base.identity, transform_key, split)

    def embed(batch: torch.Tensor) -> np.ndarray:
        device = next(base.parameters()).device
        with torch.inference_mode():
            return run_prefix(base, batch.to(device), split).float().cpu().numpy()

    return Activations(process_cache(batch_size).arrays("prefix", key, images, list_key, embed))
