"""``generator.auto_masks``: predicted train masks as keyed units, before generator prep.

One unit per instance that lacks train masks, keyed by the segmenter's identity (its settings that
change masks), the robust procedure (:mod:`persrep.segmentation.instance_masks`: a failed photo is
re-segmented from the others, then boxed, never left empty) and the instance's train pixels, published at ``<root>/masks/<key>/`` (one PNG per
train image + ``confidence.json``), manifest last. :func:`auto_masks_for` is what
:func:`persrep.pipeline.instance_data.instance_data` reads for such instances; it computes and publishes a
missing unit itself, so a planner that needs an instance's masks before the stage ran (a sweep's
data planning) gets the same unit, not a second copy.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from typing import Any

from PIL import Image

from persrep.config import content_key
from persrep.generation.shards import png_bytes
from persrep.hashing import image_fingerprint
from persrep.pipeline.executor import Outcome
from persrep.pipeline.planned import PlannedStage, StageScope
from persrep.pipeline.units import MASK_AREA, Unit
from persrep.segmentation.base import get_segmenter
from persrep.segmentation.instance_masks import PROCEDURE, predict_instance_masks

STAGE = MASK_AREA


def needs_auto_masks(ctx: Any, name: str) -> bool:
    ds = ctx.dataset
    return bool(ctx.settings.generator.auto_masks) and not all(p in ds.masks for p in ds.instances[name].train)


def masks_identity(ctx: Any) -> list[Any]:
    """What predicted masks depend on besides the pixels: the segmenter and the procedure."""
    seg = get_segmenter(ctx.settings.segmentation.segmenter, ctx.settings.segmentation)
    return [seg.identity(), {"procedure": PROCEDURE, "min_confidence": ctx.settings.segmentation.min_confidence}]


def mask_unit_key(ctx: Any, images: list[Image.Image]) -> str:
    seg_identity, procedure = masks_identity(ctx)
    return content_key("auto-masks", seg_identity, [image_fingerprint(i) for i in images], procedure)


@dataclass(frozen=True, eq=False)
class MaskUnit(Unit):
    """Auto masks: one instance without train masks."""

    instance: str
    key: str


def plan_mask_units(ctx: Any) -> list[MaskUnit]:
    """Stage 0's units: one per selected instance without train masks (none when off)."""
    if not ctx.settings.generator.auto_masks:
        return []
    ds = ctx.dataset
    units = []
    for name in sorted(ctx.instances):
        if needs_auto_masks(ctx, name):
            images = [ds.read_image(p) for p in ds.instances[name].train]
            units.append(MaskUnit(name, mask_unit_key(ctx, images)))
    return units


def run_mask_unit(ctx: Any, unit: MaskUnit) -> dict[str, Any]:
    """Segment one instance's train images; publish the masks and their confidences."""
    if ctx.storage.is_intact(STAGE, unit.key):
        return {"status": "skipped", "key": unit.key}
    ds = ctx.dataset
    images = [ds.read_image(p) for p in ds.instances[unit.instance].train]
    return _compute(ctx, unit.instance, images, unit.key)


def _compute(ctx: Any, name: str, images: list[Image.Image], key: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    s = ctx.settings.segmentation
    seg = get_segmenter(s.segmenter, s)
    outs = predict_instance_masks(seg, images, s.min_confidence)  # never an empty mask
    conf = [round(float(o.confidence), 4) for o in outs]
    sources = [o.source for o in outs]
    files = {f"{i}.png": png_bytes(o.image()) for i, o in enumerate(outs)}
    files["confidence.json"] = json.dumps(conf).encode()
    meta = {"instance": name, "segmenter": seg.identity(), "confidence": conf, "sources": sources,
            "predicted": True, "seconds": time.perf_counter() - t0}
    ctx.storage.publish(STAGE, key, files, meta)
    return {"status": "done", "key": key, "min_confidence": min(conf) if conf else None,
            "seconds": meta["seconds"]}


def auto_masks_for(ctx: Any, name: str, images: list[Image.Image]) -> list[Image.Image]:
    """The instance's predicted train masks (L, 0/255), computing the unit if it is missing."""
    key = mask_unit_key(ctx, images)
    if not ctx.storage.is_intact(STAGE, key):
        _compute(ctx, name, images, key)
    man = ctx.storage.verify_unit(STAGE, key)
    return [Image.open(io.BytesIO(ctx.storage.read_unit_file(STAGE, key, f"{i}.png", man))).convert("L")
            for i in range(len(images))]


def low_confidence_notes(ctx: Any, units: list[MaskUnit]) -> list[str]:
    """Run notes for published auto masks below ``segmentation.min_confidence``."""
    notes = []
    for u in units:
        if not ctx.storage.is_finished(STAGE, u.key):
            continue
        meta = ctx.storage.manifest(STAGE, u.key).meta
        conf, sources = meta.get("confidence", []), meta.get("sources", [])
        low = [i for i, c in enumerate(conf) if c < ctx.settings.segmentation.min_confidence]
        boxes = [i for i, src in enumerate(sources) if src == "box_fallback"]
        if boxes:
            notes.append(f"auto masks of {u.instance}: no object found in train image(s) {boxes}, a "
                         "centred box stands in; give train_masks/ for a better cut-out")
        low = [i for i in low if i not in boxes]
        if low:
            notes.append(f"auto masks of {u.instance}: train image(s) {low} have confidence < "
                         f"{ctx.settings.segmentation.min_confidence} (masks/{u.key}/); check them "
                         "or give train_masks/ (persrep data masks)")
    return notes


def planned(scope: StageScope) -> PlannedStage:
    """Auto masks (``generator.auto_masks``): one unit per instance without train masks; notes
    for masks of low confidence."""
    def report(units: list[MaskUnit], _outs: list[Outcome]) -> None:
        scope.summary.notes.extend(low_confidence_notes(scope.ctx, units))

    return PlannedStage("auto_masks", lambda: plan_mask_units(scope.ctx), run_mask_unit,
                        lambda u: f"masks:{u.instance}", report=report)
