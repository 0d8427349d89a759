"""Which settings belong in a unit's key: the ones that change a result, never operational ones.

A unit key (``content_key``) is the identity of a published result. A setting that only changes
*how* a result is computed (how often a checkpoint is written, the evaluation batch size, whether
the pretrained backbone is also evaluated, worker counts, gradient checkpointing) must not be in
it: changing it would silently recompute every adapter or evaluation (GPU-hours at paper scale).

``resources.*``, ``tracking.*``, ``storage.*`` and ``synthesis.batch_size`` / ``rows_per_shard``
never enter a key (per-image seeds make batching invisible in the pixels). Within the sections that
do enter keys, :data:`OPERATIONAL` lists the fields left out; :func:`result_settings` drops them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

# section -> fields that do not change a unit's result
OPERATIONAL: dict[str, tuple[str, ...]] = {
    "personalization": ("checkpoint_every", "channels_last"),
    "evaluation": ("batch_size", "evaluate_pretrained", "prefix_cache"),
    # recomputes activations in the backward pass: the same gradients, less memory
    "generator.dreambooth": ("gradient_checkpointing",),
    # the verdict policy: applied where a unit's rows are used (pipeline/stages/synthesis.py), not in them
    "synthesis.filter": ("min_kept_fraction", "on_empty"),
}


# section -> {field: value at which the field changes nothing}: settings added after results were
# stored (the real-photo levers of issue #26). At that value the field is left out of the key, so
# every unit stored before it existed keeps its key; any other value enters the key as usual.
NEUTRAL: dict[str, dict[str, Any]] = {
    "personalization": {"hard_negatives": {"recolour": 0, "min_hue_shift": 60.0, "context": 0},
                        "real_positive_share": 0.0, "crop_scale": [0.8, 1.0]},
    "evaluation": {"adapter_scale": 1.0, "pretrained_share": 0.0, "global_input_size": None},
}


def result_settings(section: BaseModel | dict[str, Any], name: str) -> dict[str, Any]:
    """``section`` as a JSON-able dict without the operational fields of ``name`` (a key above)
    and without the fields that sit at their :data:`NEUTRAL` value."""
    data = section.model_dump(mode="json") if isinstance(section, BaseModel) else dict(section)
    for field in OPERATIONAL.get(name, ()):
        data.pop(field, None)
    for field, neutral in NEUTRAL.get(name, {}).items():
        if field in data and data[field] == neutral:
            data.pop(field)
    return data
