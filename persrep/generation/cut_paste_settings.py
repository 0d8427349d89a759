"""Cut-and-paste's settings section, ``generator.cut_paste`` (before issue 28: ``synthesis.cut_paste``,
still read from there with a note: :func:`persrep.config.migrate_settings`).

A light module (pydantic only): :mod:`persrep.config` assembles the schema from the registered
sections without importing the generator.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from persrep.registry import GENERATOR_SECTIONS
from persrep.sections import Section, ordered_range


class CutPasteSettings(Section):
    backgrounds: str = Field("generated", description="'generated' (base model, background "
                             "prompts) or a folder of real background photos")
    num_backgrounds: int = Field(64, ge=1, le=100_000, description="generated backgrounds per "
                                 "category (drawn once, shared by the category's instances)")
    scale_range: tuple[float, float] = (0.35, 0.7)
    rotation_degrees: float = Field(15.0, ge=0, le=180)
    flip: bool = True
    edge_blur: float = Field(1.0, ge=0, le=10)

    @field_validator("scale_range")
    @classmethod
    def _scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        return ordered_range(v, 1.5)


GENERATOR_SECTIONS.add("cut_paste", CutPasteSettings)
