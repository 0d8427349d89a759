"""Storage areas: the folder under the storage root where each stage publishes its units.

One table for every reader (the stages, the driver's skip of finished units, sweeps, reports).
The folder names are part of stored runs and never change.
"""

from __future__ import annotations

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
