"""What several stages read of one instance: its train images and masks, and local scratch space."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from persrep.config import content_key
from persrep.generation.base import InstanceData


def instance_data(ctx: Any, name: str) -> InstanceData:
    """An instance's train images, category and masks (given, or predicted: auto masks)."""
    ds = ctx.dataset
    inst = ds.instances[name]
    images = [ds.read_image(p) for p in inst.train]
    masks = None
    if all(p in ds.masks for p in inst.train):
        masks = [Image.fromarray(ds.read_mask(p).astype("uint8") * 255, mode="L") for p in inst.train]
    elif ctx.settings.generator.auto_masks:  # predicted masks: a keyed unit (pipeline/stages/auto_masks.py)
        from persrep.pipeline.stages.auto_masks import auto_masks_for

        masks = auto_masks_for(ctx, name, images)
    return InstanceData(name, inst.category, images, masks)


def scratch_dir(ctx: Any, *parts: str) -> Path:
    """Local scratch space that survives a crash (checkpoints), beside a local root or in ~/.cache."""
    base = Path(ctx.storage.base) / ".scratch" if not ctx.storage.is_s3 else \
        Path.home() / ".cache" / "persrep" / "scratch" / content_key(ctx.storage.root)
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
