"""Pre-flight for the segmenters a run will use: a missing model fails before any compute."""

from __future__ import annotations

from typing import Any

from persrep.data.layout import DatasetError
from persrep.segmentation.base import require_available, segmenter_class


def preflight_segmenters(settings: Any) -> list[str]:
    """Notes for the segmenters ``settings`` use (auto masks, filter); one-line errors otherwise."""
    notes = []
    if settings.generator.auto_masks:
        name = settings.segmentation.segmenter
        if segmenter_class(name).needs.reference:
            raise DatasetError(f"generator.auto_masks with segmentation.segmenter={name}: {name} needs "
                               "reference masks to predict masks; use segmentation.segmenter=grabcut or sam "
                               "for train masks (PerSAM is for filtering and test masks)")
        notes.append("auto masks: " + require_available(name, settings.segmentation))
    flt = settings.synthesis.filter
    if flt.enabled and flt.segmenter != "none":
        notes.append("filter: " + require_available(flt.segmenter, settings.segmentation))
    return notes
