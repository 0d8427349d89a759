"""The frozen prefix of a LoRA-adapted CNN: the layers before the first adapted block.

LoRA on EfficientNet-style CNNs (``persrep.models.lora`` default targets: ``blocks.5``,
``blocks.6``, ``conv_head``) leaves the stem and the first blocks untouched, so their output
for an image is the same for the pretrained backbone and for every adapter. Running them once
per image and feeding their activations to each model's *tail* gives the same features as the
full forward (same layers, same order; tests/test_prefix_cache.py compares them), at the cost
of the tail only. Used by evaluation (``persrep.evaluation.prefix_pool``) and by ``persrep find``
(``persrep.find.models``: one trunk, many adapters per batch).

A model qualifies when it is a timm CNN with ``conv_stem``/``bn1``/``blocks``/``conv_head``/``bn2``
and every adapted module sits in ``blocks.<i>`` (i > 0) or ``conv_head``. ViTs (LoRA on every
block's ``qkv``) never do: :func:`prefix_split` returns ``None`` and callers run the full model.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["prefix_split", "run_prefix", "run_tail", "global_from_map", "hypercolumn_block", "hypercolumn"]

_CNN_PARTS = ("conv_stem", "bn1", "conv_head", "bn2")


def prefix_split(backbone, targets: Iterable[str] | None = None) -> int | None:
    """Index of the first adapted block (``blocks[:split]`` is frozen), or ``None`` when no
    exact prefix exists. ``targets``: LoRA module names (default: the backbone's own)."""
    model = backbone.model
    blocks = getattr(model, "blocks", None)
    if backbone.is_token_model or not isinstance(blocks, nn.Sequential):
        return None
    if not all(hasattr(model, a) for a in _CNN_PARTS):
        return None
    if targets is None:
        if backbone.lora_settings is None:
            return None
        targets = backbone.lora_settings["target_modules"]
    first = len(blocks)
    for target in targets:
        parts = target.split(".")
        if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit():
            first = min(first, int(parts[1]))
        elif parts[0] != "conv_head":
            return None  # an adapted layer outside the blocks (stem, bn): nothing is shared
    return first if first > 0 else None


def run_prefix(backbone, x: torch.Tensor, split: int) -> torch.Tensor:
    """Stem + ``blocks[:split]``: the activations every model built on this base shares."""
    m = backbone.model
    return m.blocks[:split](m.bn1(m.conv_stem(x)))


def hypercolumn_block(backbone) -> int | None:
    """Index in ``blocks`` whose output is the stride-16 map of the hypercolumn (EfficientNet: 4)."""
    m = backbone.model
    info = getattr(m, "feature_info", None) or []
    fine = [f["module"] for f in info if f.get("reduction") == 16]
    if not fine or not fine[-1].startswith("blocks."):
        return None
    return int(fine[-1].split(".")[1])


def run_tail(backbone, h: torch.Tensor, split: int, keep: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``blocks[split:]`` + head on prefix activations ``h``: the last feature map, and the
    output of block ``keep`` when it lies in the tail (``keep == split - 1`` is ``h`` itself)."""
    m = backbone.model
    kept = h if keep == split - 1 else None
    for i in range(split, len(m.blocks)):
        h = m.blocks[i](h)
        if i == keep:
            kept = h
    return m.bn2(m.conv_head(h)), kept


def global_from_map(fmap: torch.Tensor, feature: str) -> torch.Tensor:
    """The CNN global feature of ``Backbone.global_features`` from its last map."""
    avg = fmap.mean(dim=(2, 3))
    return avg if feature == "cls" else torch.cat([avg, fmap.amax(dim=(2, 3))], dim=1)


def hypercolumn(mid: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """The CNN hypercolumn (``Backbone.dense_features(x, "hypercolumn")``): the stride-16 map and
    the last map upsampled to its grid, each L2-normalised per cell, concatenated."""
    up = nn.functional.interpolate(nn.functional.normalize(last, dim=1), size=mid.shape[-2:],
                                   mode="bilinear", align_corners=False)
    return torch.cat([nn.functional.normalize(mid, dim=1), nn.functional.normalize(up, dim=1)], 1)
