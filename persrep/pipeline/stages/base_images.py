"""Base images (stage 3 of 7): images of the un-personalised base model shared by every instance
of a category (DreamBooth's class images, cut-and-paste's generated backgrounds), one keyed unit
per (kind, category), drawn once and published under ``<root>/base_images/<key>/`` (``00000.png``,
... + ``MANIFEST.json`` last). Which units a run needs and how their pixels are drawn:
:mod:`persrep.pipeline.shared_images`.
"""

from __future__ import annotations

import io
import time
from typing import Any

from PIL import Image

from persrep.config import Settings
from persrep.pipeline.planned import PlannedStage, StageScope
from persrep.pipeline.shared_images import KINDS, SharedImagesUnit, draw_images, shared_unit
from persrep.pipeline.units import BASE_IMAGE_AREA

STAGE = BASE_IMAGE_AREA


def plan_shared_units(settings: Settings, instances: dict[str, str]) -> list[SharedImagesUnit]:
    """Every shared unit the run needs: per category of the selected instances, each kind once."""
    out = []
    for category in sorted(set(instances.values())):
        for kind in KINDS:
            unit = shared_unit(kind, settings, category)
            if unit is not None:
                out.append(unit)
    return out


def run_shared_unit(ctx: Any, unit: SharedImagesUnit) -> dict[str, Any]:
    """Draw and publish one shared unit (skipped when already published intact)."""
    if ctx.storage.is_intact(STAGE, unit.key):
        return {"status": "skipped", "key": unit.key}
    t0 = time.perf_counter()
    files = {}
    for i, image in enumerate(draw_images(ctx.settings, unit)):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        files[f"{i:05d}.png"] = buf.getvalue()
    meta = {"kind": unit.kind, "category": unit.category, "prompts": unit.prompts, "count": unit.count,
            "seed": unit.seed, "sampler": unit.sampler, "seconds": time.perf_counter() - t0}
    ctx.storage.publish(STAGE, unit.key, files, meta)
    return {"status": "done", "key": unit.key, "images": len(files), "seconds": meta["seconds"]}


def read_shared_images(storage: Any, key: str) -> list[Image.Image]:
    """A published unit's images, in order (checksums verified)."""
    man = storage.verify_unit(STAGE, key)
    images = []
    for name in sorted(f for f in man.files if f.endswith(".png")):
        with Image.open(io.BytesIO(storage.read_unit_file(STAGE, key, name, man))) as im:
            images.append(im.convert("RGB"))
    if not images:
        raise ValueError(f"shared images unit {storage.uri(STAGE, key)} has no images")
    return images


def planned(scope: StageScope) -> PlannedStage:
    """Base images shared per category (class images, generated backgrounds): drawn once; a unit
    reserves what a synthesis unit does."""
    return PlannedStage("base_images", lambda: plan_shared_units(scope.ctx.settings, scope.ctx.instances),
                        run_shared_unit, lambda u: f"{u.kind}:{u.category}", resources="synthesis")
