"""Base-model images shared by every instance of a category: which units a run needs, and their pixels.

The stage that plans, draws and publishes them is ``persrep.pipeline.stages.base_images``.

Two kinds, both drawn from the *un-personalised* base model and published under
``<root>/base_images/<key>/`` (``00000.png``, ... + ``MANIFEST.json`` last):

- ``class_images``: DreamBooth's prior-preservation images, ``class_prompt`` for the category,
  ``generator.dreambooth.num_class_images`` of them at the DreamBooth resolution. Drawn once per
  category (not once per instance, not once per worker's scratch directory) and read by every
  DreamBooth unit of the category.
- ``backgrounds``: cut-and-paste's generated backgrounds (``synthesis.cut_paste.backgrounds:
  generated``, the paper's setting), ``synthesis.cut_paste.num_backgrounds`` images from the
  scene prompts :data:`~persrep.generation.cut_paste.BACKGROUND_PROMPTS`, one unit per
  (category, prompt list, seed), shared by the category's instances. A positive picks its
  background by its placement's background seed (:class:`persrep.generation.cut_paste.PublishedBackgrounds`).

A unit's key hashes what determines its pixels: kind, category, prompts, count, seed, the base
model's identity and the sampler (steps, scheduler, guidance, resolution); never batch sizes.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from typing import Any

from PIL import Image

from persrep.config import Settings, content_key
from persrep.generation.base import any_generator
from persrep.hashing import stable_seed
from persrep.pipeline.units import Unit

CLASS_GUIDANCE = 7.5  # the DreamBooth reference's class-image guidance scale
CLASS_IMAGES, BACKGROUNDS = "class_images", "backgrounds"  # the kinds (generators' shared_inputs)


@dataclass(frozen=True, eq=False)
class SharedImagesUnit(Unit):
    kind: str  # "class_images" | "backgrounds"
    category: str
    prompts: list[str]
    count: int
    seed: int
    sampler: dict[str, Any]  # steps, scheduler, cfg, resolution
    key: str = ""


def _base(settings: Settings) -> dict[str, Any]:
    from persrep.models.diffusion import component_identity

    return component_identity(settings.generator.base_model)


def class_images_unit(settings: Settings, category: str) -> SharedImagesUnit | None:
    """The category's prior-preservation images, or None when no DreamBooth type needs them."""
    db, syn = settings.generator.dreambooth, settings.synthesis
    dreambooth = any_generator(settings.generator.types, lambda c: CLASS_IMAGES in c.shared_inputs)
    if not (dreambooth and db.prior_preservation and db.prior_loss_weight > 0 and db.num_class_images > 0):
        return None
    unit = SharedImagesUnit("class_images", category, [db.class_prompt.format(category=category)],
                            db.num_class_images, db.seed,
                            {"steps": syn.inference_steps, "scheduler": syn.scheduler,
                             "cfg": CLASS_GUIDANCE, "resolution": db.resolution})
    return _keyed(unit, settings)


def _keyed(unit: SharedImagesUnit, settings: Settings) -> SharedImagesUnit:
    return replace(unit, key=content_key("base-images", unit.kind, unit.category, unit.prompts, unit.count,
                                         unit.seed, unit.sampler, _base(settings)))


def backgrounds_unit(settings: Settings, category: str) -> SharedImagesUnit | None:
    """The category's generated backgrounds, or None unless cut-and-paste draws generated ones."""
    from persrep.generation.cut_paste import BACKGROUND_PROMPTS, GENERATED

    syn = settings.synthesis
    if not any_generator(settings.generator.types, lambda c: BACKGROUNDS in c.shared_inputs) \
            or syn.cut_paste.backgrounds != GENERATED:
        return None
    unit = SharedImagesUnit("backgrounds", category, list(BACKGROUND_PROMPTS), syn.cut_paste.num_backgrounds,
                            syn.seed, {"steps": syn.inference_steps, "scheduler": syn.scheduler,
                                       "cfg": float(syn.cfg[0]), "resolution": syn.resolution})
    return _keyed(unit, settings)


def shared_unit(kind: str, settings: Settings, category: str) -> SharedImagesUnit | None:
    """The category's shared unit of ``kind`` (``class_images`` / ``backgrounds``), or None."""
    if kind not in (CLASS_IMAGES, BACKGROUNDS):
        raise ValueError(f"unknown shared images kind {kind!r}: one of {[CLASS_IMAGES, BACKGROUNDS]}")
    return (class_images_unit if kind == CLASS_IMAGES else backgrounds_unit)(settings, category)


def draw_images(settings: Settings, unit: SharedImagesUnit) -> list[Image.Image]:
    if unit.kind == "class_images":
        from persrep.generation.dreambooth import class_images

        db, syn = settings.generator.dreambooth, settings.synthesis
        with tempfile.TemporaryDirectory() as tmp:  # the published unit is the cache
            return class_images(settings.generator.base_model, unit.category, unit.count, db.resolution,
                                unit.seed, tmp, db.class_prompt, syn.inference_steps,
                                guidance_scale=CLASS_GUIDANCE, scheduler=syn.scheduler,
                                batch_size=syn.batch_size)
    from persrep.generation.cut_paste import BaseModelBackgrounds
    from persrep.generation.dreambooth import BaseModelSampler

    source = BaseModelBackgrounds(BaseModelSampler(settings), unit.sampler["cfg"])
    seeds = [stable_seed("background", unit.category, unit.seed, i) for i in range(unit.count)]
    images: list[Image.Image] = []
    for start in range(0, len(seeds), settings.synthesis.batch_size):
        images += source.many(seeds[start:start + settings.synthesis.batch_size], unit.sampler["resolution"])
    return images
