"""Base-model images shared by every instance of a category: which units a run needs, and their pixels.

The stage that plans, draws and publishes them is ``persrep.pipeline.stages.base_images``.

Two kinds, both drawn from the *un-personalised* base model and published under
``<root>/base_images/<key>/`` (``00000.png``, ... + ``MANIFEST.json`` last). What a unit holds and
how it is drawn is declared by the generator type that reads it (its capabilities'
``shared_inputs``, its ``shared_input`` and ``draw_shared`` class methods); this module loops over
the configured types and never names one. Today's two:

- ``class_images``: DreamBooth's prior-preservation images, ``class_prompt`` for the category,
  ``generator.dreambooth.num_class_images`` of them at the DreamBooth resolution. Drawn once per
  category (not once per instance, not once per worker's scratch directory) and read by every
  DreamBooth unit of the category.
- ``backgrounds``: cut-and-paste's generated backgrounds (``generator.cut_paste.backgrounds:
  generated``, the paper's setting), ``generator.cut_paste.num_backgrounds`` images from the
  scene prompts :data:`~persrep.generation.cut_paste.BACKGROUND_PROMPTS`, one unit per
  (category, prompt list, seed), shared by the category's instances. A positive picks its
  background by its placement's background seed (:class:`persrep.generation.cut_paste.PublishedBackgrounds`).

A unit's key hashes what determines its pixels: kind, category, prompts, count, seed, the base
model's identity and the sampler (steps, scheduler, guidance, resolution); never batch sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from PIL import Image

from persrep.config import Settings, content_key
from persrep.generation.base import Sampler, SharedInput, generator_class, section_of
from persrep.pipeline.units import Unit

CLASS_IMAGES, BACKGROUNDS = "class_images", "backgrounds"  # the kinds (generators' shared_inputs)
KINDS = (CLASS_IMAGES, BACKGROUNDS)  # planned in this order, per category


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


def shared_unit(kind: str, settings: Settings, category: str) -> SharedImagesUnit | None:
    """The category's shared unit of ``kind`` (``class_images`` / ``backgrounds``), or None: the
    first configured generator type that declares ``kind`` among its shared inputs says what it
    reads (:meth:`~persrep.generation.base.PersonalizedGenerator.shared_input`)."""
    if kind not in KINDS:
        raise ValueError(f"unknown shared images kind {kind!r}: one of {list(KINDS)}")
    for type_name, cls, section in _declaring(settings, kind):
        spec = cls.shared_input(kind, section, Sampler.of(settings), category)
        if spec is not None:
            unit = SharedImagesUnit(kind, category, list(spec.prompts), spec.count, spec.seed, dict(spec.sampler))
            return replace(unit, key=content_key("base-images", unit.kind, unit.category, unit.prompts,
                                                 unit.count, unit.seed, unit.sampler, _base(settings)))
    return None


def _declaring(settings: Settings, kind: str):
    """(type name, class, its section) of each configured generator type that reads ``kind``."""
    for type_name in settings.generator.types:
        cls = generator_class(type_name)
        if kind in cls.capabilities.shared_inputs:
            yield type_name, cls, section_of(cls, settings)


def class_images_unit(settings: Settings, category: str) -> SharedImagesUnit | None:
    """The category's prior-preservation images, or None when no configured type reads them."""
    return shared_unit(CLASS_IMAGES, settings, category)


def backgrounds_unit(settings: Settings, category: str) -> SharedImagesUnit | None:
    """The category's generated backgrounds, or None when no configured type draws generated ones."""
    return shared_unit(BACKGROUNDS, settings, category)


def draw_images(settings: Settings, unit: SharedImagesUnit) -> list[Image.Image]:
    """The unit's images, drawn by the type that declared it (the first configured one)."""
    for _type_name, cls, section in _declaring(settings, unit.kind):
        spec = SharedInput(unit.prompts, unit.count, unit.seed, unit.sampler)
        return cls.draw_shared(unit.kind, spec, unit.category, section, Sampler.of(settings))
    raise ValueError(f"shared images unit {unit.kind!r}: no configured generator type reads it")
