"""The base of every unit of work: a frozen dataclass with a ``key`` (its identity in storage),
the storage area each stage publishes its units to, and the error of a unit whose output may not
be used.

The area names are part of stored runs and never change (``<root>/<area>/<key>/``)."""

from __future__ import annotations

from typing import Any

# -- storage areas: where each stage publishes its units (one table for every reader) -------------
MASK_AREA = "masks"              # auto masks: <root>/masks/<key>/
CAPTION_AREA = "captions"        # LLM captions: <root>/captions/<key>/captions.json
BASE_IMAGE_AREA = "base_images"  # class images, generated backgrounds
GENERATOR_AREA = "generators"    # trained generators (not the registry persrep.registry.GENERATORS)
SYNTHESIS_AREA = "synthesis"     # persrep.generation.shards.STAGE
ADAPTERS = "adapters"            # trained LoRA adapters
EVALUATIONS = "evaluations"      # result rows

# stage -> the area its units publish to (the area each unit function checks before computing)
STAGE_AREAS: dict[str, str] = {"auto_masks": MASK_AREA, "captions": CAPTION_AREA,
                               "base_images": BASE_IMAGE_AREA, "generator_prep": GENERATOR_AREA,
                               "personalization": ADAPTERS, "evaluation": EVALUATIONS}


class Unit:
    """Base of the frozen unit dataclasses (one per stage, in ``persrep.pipeline.stages``)."""

    key: str


class UnitRejected(RuntimeError):
    """A unit ran, but its output may not be used. Not retried: the same inputs give the same rows.

    ``details`` is the failure record (counts, score distribution, every distinct error), kept in
    the run's summary."""

    retryable = False

    def __init__(self, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.details = dict(details or {})
