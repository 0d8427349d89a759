"""Predicted masks for a data set: ``persrep data masks SRC`` and ``data import --auto-masks``.

Writes ``train_masks/<instance>/<stem>.png`` (and ``test_masks/`` when asked) for every image that
has no mask, with the segmenter of ``segmentation.*``, and labels them in the info file::

    "predicted_masks": {"train": {"segmenter": {...identity...}, "status": "complete",
                                  "instances": [...], "written": "2026-..."}},
    "mask_confidence": {"train_masks/a/0.png": 0.91, ...}

so every reader (``data check``, reports) can tell predicted masks from provided ones. Provided
masks are never overwritten (``overwrite=True`` replaces predicted *and* provided ones). Resume:
the split's record lists the instances to predict; an instance is done when each of its masks has
a confidence entry, so an interrupted command finishes the rest when run again.

PerSAM needs a reference: for ``test`` it uses the instance's train images with their (provided
or just predicted) train masks; it cannot make train masks of mask-less data (use grabcut or sam).
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from persrep.data.layout import DatasetError, InstanceDataset, open_dataset
from persrep.generation.shards import png_bytes
from persrep.segmentation.base import Reference, get_segmenter, require_available

Progress = Callable[[str], None]
INFO_DEFAULT = "dataset_info.json"


@dataclass
class MasksResult:
    path: str
    segmenter: str
    written: dict[str, int] = field(default_factory=dict)  # split -> masks written now
    kept: dict[str, int] = field(default_factory=dict)  # split -> masks already there
    confidence: dict[str, float] = field(default_factory=dict)  # mask rel -> confidence (this run)
    seconds: float = 0.0

    @property
    def low(self) -> list[str]:
        return sorted(k for k, v in self.confidence.items() if v < self.threshold)

    threshold: float = 0.5


def mask_rel(image_rel: str) -> str:
    """``train/a/0.jpg`` -> ``train_masks/a/0.png``."""
    p = PurePosixPath(image_rel)
    return str(PurePosixPath(f"{p.parts[0]}_masks", *p.parts[1:-1], p.stem + ".png"))


def read_info(ds: InstanceDataset) -> tuple[dict[str, Any], str]:
    if ds.info_file is None:
        return {}, INFO_DEFAULT
    return json.loads(ds.read_bytes(ds.info_file)), ds.info_file


def write_masks(path: str, settings: Any, *, splits: tuple[str, ...] = ("train",), overwrite: bool = False,
                s3_endpoint: str | None = None, progress: Progress | None = None) -> MasksResult:
    """Predict and write the missing masks of ``splits`` (see the module docstring)."""
    say = progress or (lambda _m: None)
    t0 = time.perf_counter()
    name = settings.segmenter
    for split in splits:
        if split not in ("train", "test", "test_dense"):
            raise DatasetError(f"data masks: unknown split {split!r}: use train, test or test_dense")
    ds = open_dataset(path, s3_endpoint)
    info, info_rel = read_info(ds)
    seg = get_segmenter(name, settings)
    if seg.needs.reference and "train" in splits and (overwrite or not ds.has_masks("train")):
        raise DatasetError(f"{path}: segmenter {name} needs reference masks (the train masks) and cannot "
                           "make train masks itself: run `persrep data masks SRC --segmenter grabcut` "
                           "(or sam) for train first, then --test with persam")
    require_available(name, settings)  # a missing model fails here, before any pixel is read
    result = MasksResult(ds.root, name, threshold=settings.min_confidence)
    predicted = info.setdefault("predicted_masks", {})
    confidence: dict[str, float] = info.setdefault("mask_confidence", {})
    for split in splits:
        record = predicted.get(split)
        if record and record.get("status") == "partial" and record.get("segmenter") == seg.identity():
            todo = list(record["instances"])  # resume the interrupted command's own list
        else:
            todo = [n for n in ds.names if ds.instances[n].images.get(split)
                    and (overwrite or any(p not in ds.masks for p in ds.instances[n].images[split]))]
            if not todo:
                result.kept[split] = sum(len(i.images.get(split, [])) for i in ds.instances.values())
                continue
            predicted[split] = {"segmenter": seg.identity(), "status": "partial", "instances": todo,
                                "note": "masks predicted by a segmenter, not annotated"}
            ds.storage.write_bytes(info_rel, json.dumps(info, indent=1).encode())
        result.written[split] = result.kept[split] = 0
        for i, inst_name in enumerate(todo):
            rels = ds.instances[inst_name].images[split]
            if all(mask_rel(r) in confidence for r in rels) and not overwrite:
                result.kept[split] += len(rels)
                continue
            say(f"{split} masks {i + 1}/{len(todo)}: {inst_name} ({name})")
            images = [ds.read_image(r) for r in rels]
            reference = _reference(ds, inst_name, s3_endpoint) if split != "train" else None
            for rel, out in zip(rels, seg.segment(images, reference)):
                mrel = mask_rel(rel)
                old = ds.masks.get(rel)
                if old and old != mrel:  # a provided mask with another extension: replaced
                    ds.storage.write_bytes(old, png_bytes(out.image()))
                    mrel = old
                ds.storage.write_bytes(mrel, png_bytes(out.image()))
                confidence[mrel] = result.confidence[mrel] = round(float(out.confidence), 4)
                result.written[split] += 1
            ds.storage.write_bytes(info_rel, json.dumps(info, indent=1).encode())  # progress
        predicted[split].update(status="complete",
                                written=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
        ds.storage.write_bytes(info_rel, json.dumps(info, indent=1).encode())
    result.seconds = time.perf_counter() - t0
    return result


def _reference(ds: InstanceDataset, name: str, s3_endpoint: str | None) -> Reference | None:
    """The instance's train images with their masks as they are now on storage."""
    fresh = open_dataset(ds.root, s3_endpoint)
    rels = fresh.instances[name].train
    if not all(r in fresh.masks for r in rels):
        return None
    return Reference([fresh.read_image(r) for r in rels], [fresh.read_mask(r) for r in rels])


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0
