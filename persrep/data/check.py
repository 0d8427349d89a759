"""Validate a data set before spending compute: ``persrep data check PATH``.

Every stage calls :func:`check_dataset` first. Findings have a severity:
``error`` (the run cannot use this data: exit 2), ``warning`` (usable, but results may differ
from the benchmarks: exit 1), ``note`` (handled automatically, e.g. a CMYK image converted).
"""

from __future__ import annotations

import io
import json
import unicodedata
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np
from PIL import Image

from persrep.data.info_check import check_info
from persrep.data.layout import (MAX_IMAGE_PIXELS, DatasetError, InstanceDataset, decode_image,
                                 open_dataset)

_CONVERTED_MODES = {"CMYK", "P", "PA", "RGBA", "LA", "L", "1", "I;16", "I;16B", "I;16L", "I", "F", "YCbCr", "LAB", "HSV"}


@dataclass
class Finding:
    severity: str  # error | warning | note
    where: str
    problem: str
    fix: str

    def line(self) -> str:
        return f"{self.severity.upper():7s} {self.where}: {self.problem} -> {self.fix}"


@dataclass
class CheckReport:
    root: str
    findings: list[Finding] = field(default_factory=list)
    n_instances: int = 0
    n_images: int = 0
    n_masks: int = 0

    def add(self, severity: str, where: str, problem: str, fix: str) -> None:
        self.findings.append(Finding(severity, where, problem, fix))

    def of(self, severity: str) -> list[Finding]:
        return [f for f in self.findings if f.severity == severity]

    @property
    def exit_code(self) -> int:
        return 2 if self.of("error") else 1 if self.of("warning") else 0

    def summary(self) -> str:
        head = (f"data check {self.root}: {self.n_instances} instances, {self.n_images} images, "
                f"{self.n_masks} masks -> {len(self.of('error'))} errors, "
                f"{len(self.of('warning'))} warnings, {len(self.of('note'))} notes")
        order = {"error": 0, "warning": 1, "note": 2}
        body = [f.line() for f in sorted(self.findings, key=lambda f: (order[f.severity], f.where))]
        return "\n".join([head, *body])

    def raise_on_errors(self) -> None:
        errs = self.of("error")
        if len(errs) == 1:  # one problem, one line
            raise DatasetError(f"data set has an error: {errs[0].line()}")
        if errs:
            more = f" (+{len(errs) - 5} more; run `persrep data check {self.root}`)" if len(errs) > 5 else ""
            raise DatasetError("data set has errors:\n" + "\n".join(f.line() for f in errs[:5]) + more)


def check_name(name: str) -> tuple[str, str] | None:
    """(severity, problem) for an instance name, or None when it is fine."""
    if name in ("", ".", "..") or "/" in name or "\\" in name or ".." in name:
        return "error", f"unsafe instance name {name!r} (path traversal)"
    if any(unicodedata.category(c).startswith("C") for c in name) or name.startswith("."):
        return "error", f"unsafe instance name {name!r} (control character or hidden name)"
    if " " in name or not name.isascii():
        return "warning", f"instance name {name!r} has spaces or non-ASCII characters"
    return None


def _inspect_image(data: bytes, where: str, report: CheckReport) -> tuple[int, int] | None:
    """Decode fully; record problems; return (width, height) or None if unusable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            head = Image.open(io.BytesIO(data)) if data else None
        if head is not None and head.width * head.height > MAX_IMAGE_PIXELS:
            report.add("error", where, f"{head.width}x{head.height} exceeds {MAX_IMAGE_PIXELS:,} pixels "
                       "(decompression-bomb guard)", "downscale the image")
            return None
        mode = head.mode if head is not None else None
        img = decode_image(data, where)
    except DatasetError as exc:  # "<where>: <problem>: <fix>"
        problem, _, fix = str(exc).removeprefix(f"{where}: ").rpartition(": ")
        report.add("error", where, problem or fix, fix if problem else "replace or remove the file")
        return None
    except Exception as exc:  # noqa: BLE001
        report.add("error", where, f"not a readable image ({type(exc).__name__})", "replace or remove the file")
        return None
    if mode in _CONVERTED_MODES:
        report.add("note", where, f"mode {mode}", "converted to RGB when read")
    return img.size


def check_dataset(path_or_ds: str | InstanceDataset, *, deep: bool = True,
                  expect_train: int = 3, dense_tasks: bool = False,
                  progress: Callable[[str], None] | None = None,
                  needs_categories: bool = False) -> CheckReport:
    """Validate layout, names, images and masks. ``deep`` decodes every file (else headers only).
    ``needs_categories``: an instance without a category is an error (else a warning)."""
    try:
        ds = path_or_ds if isinstance(path_or_ds, InstanceDataset) else open_dataset(path_or_ds)
    except DatasetError as exc:
        report = CheckReport(str(path_or_ds))
        report.add("error", str(path_or_ds), str(exc), "fix the layout")
        return report
    report = CheckReport(ds.root, n_instances=len(ds.instances))
    confidence = _predicted_mask_confidence(ds, report)
    seen: dict[str, str] = {}
    for name in ds.names:
        bad = check_name(name)
        if bad:
            fix = "rename the folder to letters, digits, '_' or '-'"
            report.add(bad[0], f"instance {name!r}", bad[1], fix)
        folded = unicodedata.normalize("NFKC", name).casefold()
        if folded in seen:
            report.add("error", f"instance {name!r}", f"duplicate of {seen[folded]!r} "
                       "(same name ignoring case/unicode form)", "rename one of them")
        seen[folded] = name
    for i, name in enumerate(ds.names):
        inst = ds.instances[name]
        if progress and i % 10 == 0:
            progress(f"checking {i + 1}/{len(ds.names)}: {name}")
        n_train = len(inst.train)
        if n_train == 0:
            report.add("error", f"train/{name}", "instance has no train images",
                       f"add {expect_train} photos or remove the instance")
        elif n_train != expect_train:
            report.add("warning", f"train/{name}", f"{n_train} train images (the benchmarks use "
                       f"exactly {expect_train})", f"re-import with {expect_train} train images "
                       "for comparable results")
        if not inst.test:
            report.add("warning", f"test/{name}", "no test images", "the instance is not evaluated "
                       "as a query; add test photos")
        if ds.splits and name not in ds.splits:
            report.add("warning", f"instance {name!r}", "missing from class_to_split", "add it to the info file")
        for split, rels in inst.images.items():
            for rel in rels:
                report.n_images += 1
                size = _check_file(ds, rel, report, deep)
                _check_mask(ds, rel, size, split, report, deep, confidence)
    check_info(ds, report, needs_categories)  # info file vs folders (info_check.py)
    if dense_tasks and not ds.has_masks("test"):
        report.add("warning", ds.root, "dense tasks asked but test images lack masks",
                   "detection/segmentation will be skipped; add test_masks/")
    if ds.scenes:
        unknown = {rel for rel in ds.scenes if not any(rel in i.test for i in ds.instances.values())}
        if unknown:
            report.add("warning", ds.info_file or ds.root, f"{len(unknown)} image_to_scene entries "
                       "name no test image", "regenerate the info file")
    return report


def _predicted_mask_confidence(ds: InstanceDataset, report: CheckReport) -> dict[str, float]:
    """``mask_confidence`` of the info file (written by `persrep data masks`); notes which splits'
    masks are predicted, not annotated."""
    if not ds.info_file:
        return {}
    try:
        info = json.loads(ds.read_bytes(ds.info_file))
    except (ValueError, OSError):
        return {}  # an unreadable info file is reported by the layout reader
    for split, rec in (info.get("predicted_masks") or {}).items():
        if isinstance(rec, dict):
            status = rec.get("status", "?")
            report.add("warning" if status != "complete" else "note", f"{split}_masks",
                       f"masks predicted by {rec.get('segmenter', {}).get('segmenter', '?')} "
                       f"(not annotated; {status})",
                       "re-run `persrep data masks` to finish" if status != "complete"
                       else "results that use them are labelled as from predicted masks")
    conf = info.get("mask_confidence") or {}
    return {str(k): float(v) for k, v in conf.items() if isinstance(v, (int, float))}


def _check_file(ds: InstanceDataset, rel: str, report: CheckReport, deep: bool) -> tuple[int, int] | None:
    where = ds.storage.uri(rel)
    bad = check_name(PurePosixPath(rel).name)
    if bad and bad[0] == "error":
        report.add("error", where, bad[1].replace("instance", "file"), "rename the file")
        return None
    try:
        data = ds.read_bytes(rel)
    except Exception as exc:  # noqa: BLE001
        report.add("error", where, f"cannot read ({exc})", "check permissions")
        return None
    if not data:
        report.add("error", where, "empty file (0 bytes)", "replace or remove the file")
        return None
    if not deep:
        try:
            return Image.open(io.BytesIO(data)).size
        except Exception:  # noqa: BLE001
            report.add("error", where, "not a readable image", "replace or remove the file")
            return None
    return _inspect_image(data, where, report)


def _check_mask(ds: InstanceDataset, rel: str, size: tuple[int, int] | None, split: str,
                report: CheckReport, deep: bool, confidence: dict[str, float] | None = None) -> None:
    mrel = ds.masks.get(rel)
    split_has_masks = any(ds.masks.get(p) for i in ds.instances.values() for p in i.images.get(split, []))
    if mrel is None:
        if split_has_masks:
            report.add("warning", ds.storage.uri(rel), "no mask although other images of this "
                       "split have one", f"add {split}_masks/{PurePosixPath(rel).relative_to(split)}"
                       " (.png)")
        return
    report.n_masks += 1
    where = ds.storage.uri(mrel)
    try:
        data = ds.read_bytes(mrel)
        mask_img = decode_image(data, where)
    except DatasetError as exc:
        report.add("error", where, str(exc).split(": ", 1)[-1], "replace the mask")
        return
    if size and mask_img.size != size:
        report.add("error", where, f"mask is {mask_img.width}x{mask_img.height} but its image is "
                   f"{size[0]}x{size[1]}", "regenerate the mask at the image's size")
        return
    if deep and not (np.asarray(mask_img.convert("L")) > 0).any():
        sev = "error" if split == "train" else "warning"
        report.add(sev, where, "mask is empty (all zero)", "fix the mask (foreground > 0)"
                   + (" - cut-and-paste and masked DreamBooth need it" if split == "train" else ""))
    elif deep:
        _check_mask_quality(np.asarray(mask_img.convert("L")) > 0, where, mrel, confidence or {}, report)


MASK_WHOLE_FRAME = 0.95  # foreground share above which a mask is "the whole frame"
MASK_TINY = 0.005  # foreground share below which a mask is "tiny"
MASK_LOW_CONFIDENCE = 0.5  # predicted masks (info file mask_confidence) below this are flagged


def _check_mask_quality(mask: np.ndarray, where: str, mrel: str, confidence: dict[str, float],
                        report: CheckReport) -> None:
    """Masks that are nearly the whole frame or tiny, and predicted masks of low confidence."""
    share = float(mask.mean())
    redo = "re-draw it, or predict it again (`persrep data masks --overwrite`, another segmenter)"
    if share > MASK_WHOLE_FRAME:
        report.add("warning", where, f"mask covers {share:.0%} of the frame (nearly the whole image)", redo)
    elif share < MASK_TINY:
        report.add("warning", where, f"mask is tiny ({share:.2%} of the frame)", redo)
    conf = confidence.get(mrel)
    if conf is not None and conf < MASK_LOW_CONFIDENCE:
        report.add("warning", where, f"predicted mask (automatic) has low confidence {conf:.2f} "
                   f"< {MASK_LOW_CONFIDENCE}", "look at it; " + redo)
