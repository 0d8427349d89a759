"""DreamBooth's settings section, ``generator.dreambooth`` (shared by ``masked_dreambooth``).

A light module (pydantic only): :mod:`persrep.config` assembles the schema from the registered
sections without importing the generator (torch, diffusers). The template prompts below are also
the run's template prompts for every type (:class:`persrep.generation.base.Sampler`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from persrep.registry import GENERATOR_SECTIONS
from persrep.sections import Section


class DreamBoothSettings(Section):
    instance_prompt: str = "a photo of <new1> {category}"
    class_prompt: str = "A photo of {category}"
    steps: int = Field(400, ge=1, le=100_000)
    learning_rate: float = Field(2e-6, gt=0, le=1.0)
    batch_size: int = Field(1, ge=1, le=64)
    resolution: int = Field(512, ge=32, le=2048)
    prior_preservation: bool = True
    prior_loss_weight: float = Field(1.0, ge=0)
    num_class_images: int = Field(200, ge=0, le=10_000)
    train_text_encoder: bool = True
    use_lora: bool = False
    lora_rank: int = Field(4, ge=1, le=256)
    gradient_checkpointing: bool = True
    use_8bit_adam: bool = True
    mixed_precision: Literal["no", "fp16", "bf16"] = "fp16"
    mask_floor: float = Field(0.01, ge=0, le=1, description="masked DreamBooth background weight")
    seed: int = 1234


GENERATOR_SECTIONS.add("dreambooth", DreamBoothSettings)
