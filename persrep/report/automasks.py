"""The run's automatic masks (``generator.auto_masks``), as the report reads them back.

``units.json`` names each instance's mask unit (label ``masks:<instance>``, its key); the unit's
manifest holds the confidence of each train image's mask, and ``<i>.png`` the mask itself.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

STAGE = "masks"


@dataclass
class AutoMask:
    instance: str
    key: str
    confidence: list[float] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # per train image: how its mask was made

    @property
    def boxes(self) -> int:
        """Train images whose mask is the labelled centred box (nothing was found there)."""
        return sum(s == "box_fallback" for s in self.sources)

    @property
    def lowest(self) -> float:
        return min(self.confidence) if self.confidence else math.nan


class AutoMasks:
    """instance -> :class:`AutoMask` of a run (empty when the run predicted no masks)."""

    def __init__(self, run_source: str, settings: dict[str, Any] | None = None, units: list[dict] | None = None):
        from persrep.report.tables import run_root
        from persrep.storage import Storage

        self.masks: dict[str, AutoMask] = {}
        self.storage = None
        threshold = ((settings or {}).get("segmentation") or {}).get("min_confidence")
        self.threshold: float | None = float(threshold) if threshold is not None else None
        if units is None:
            from persrep.report.tables import _read

            raw = _read(str(run_source), "units.json")
            units = json.loads(raw) if raw else []
        found = [u for u in units if u.get("stage") == "auto_masks" and u.get("key")
                 and u.get("status") != "failed" and str(u.get("label", "")).startswith("masks:")]
        if not found:
            return
        endpoint = ((settings or {}).get("storage") or {}).get("s3_endpoint")
        self.storage = Storage(run_root(str(run_source)), endpoint)
        for u in found:
            inst = u["label"].split(":", 1)[1]
            try:
                meta = self.storage.manifest(STAGE, u["key"]).meta
            except Exception:  # noqa: BLE001 - the unit was deleted since: no confidence to show
                meta = {}
            conf, sources = meta.get("confidence") or [], meta.get("sources") or []
            self.masks[inst] = AutoMask(inst, u["key"], [float(c) for c in conf], [str(x) for x in sources])

    def __bool__(self) -> bool:
        return bool(self.masks)

    def lowest(self) -> dict[str, float]:
        """instance -> the lowest confidence of its train images' masks."""
        return {i: m.lowest for i, m in self.masks.items() if m.confidence}

    def boxes(self) -> dict[str, int]:
        """instance -> how many of its train images got the centred-box fallback (only those with any)."""
        return {i: m.boxes for i, m in self.masks.items() if m.boxes}

    def mask(self, instance: str, index: int) -> np.ndarray | None:
        """The predicted mask of train image ``index`` (bool array), None when unreadable."""
        from PIL import Image

        m = self.masks.get(instance)
        if m is None or self.storage is None:
            return None
        try:
            raw = self.storage.read_unit_file(STAGE, m.key, f"{index}.png")
        except Exception:  # noqa: BLE001
            return None
        return np.asarray(Image.open(io.BytesIO(raw)).convert("L")) > 127


__all__ = ["AutoMask", "AutoMasks"]
