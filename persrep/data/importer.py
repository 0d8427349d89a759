"""``persrep data import SRC DEST``: a folder-per-instance photo collection -> the reference layout.

SRC holds ``<instance>/<image>`` files. Which images train: the first N in natural name order
(``--train-count``, default 3) or explicit positions (``--train-indices 0,24,48``); the rest are
test images. Masks (optional) mirror SRC: ``MASKS/<instance>/<stem>.<ext>``. Categories: a mapping
file (DreamBooth's ``prompts_and_classes.txt``, a two-column CSV ``instance,category``, or a JSON
object), picked up automatically from ``SRC/prompts_and_classes.txt``, or one ``--category`` for
all; otherwise every instance gets the category ``object``.

Image bytes are copied unchanged (no re-encoding); masks are normalised to 0/255 PNG. DEST is
built under a temporary name and renamed at the end, so an interrupted import leaves nothing
that looks complete. The source is validated first; unreadable files stop the import (listed)
unless ``skip_bad`` is set, in which case they are left out and reported.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from persrep.data.check import check_name
from persrep.data.layout import DatasetError, decode_image, is_image_name, natural_key


@dataclass
class ImportResult:
    dest: Path
    instances: int
    train_images: int
    test_images: int
    masks: int
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def line(self, what: str = "instances") -> str:
        """One summary line (plus its notes): what the converters (df2, dogs) print."""
        extra = "".join(f"\n  note: {n}" for n in self.notes)
        return (f"{self.instances} {what} ({self.train_images} train, {self.test_images} test images, "
                f"{self.masks} masks) written to {self.dest}{extra}")


def read_category_map(path: str | Path) -> dict[str, str]:
    """Parse a category mapping: DreamBooth prompts_and_classes.txt, CSV, or JSON."""
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"category file {p}: not found")
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"category file {p}: invalid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise DatasetError(f"category file {p}: expected an object {{instance: category}}")
        return {str(k): str(v) for k, v in data.items()}
    mapping: dict[str, str] = {}
    for row in csv.reader(io.StringIO(text)):
        # DreamBooth's file has a "subject_name,class" table followed by prompt lists: stop there
        if len(row) == 2 and row[0].strip() and not row[0].strip().startswith(("'", "[", "#")):
            k, v = row[0].strip(), row[1].strip()
            if k in ("subject_name", "instance") and v in ("class", "category"):
                continue
            if " " in k or "=" in k:
                continue
            mapping[k] = v
    if not mapping:
        raise DatasetError(f"category file {p}: no 'instance,category' rows found")
    return mapping


def _parse_indices(text: str | list[int] | None) -> list[int] | None:
    if text is None or isinstance(text, list):
        return text
    try:
        out = [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise DatasetError(f"--train-indices {text!r}: expected comma-separated integers like 0,24,48") from None
    if not out or len(set(out)) != len(out):
        raise DatasetError(f"--train-indices {text!r}: need distinct integers")
    return out


def _mask_for(masks_dir: Path | None, inst: str, image_name: str) -> Path | None:
    if masks_dir is None:
        return None
    stem = Path(image_name).stem
    for cand in sorted((masks_dir / inst).glob(f"{stem}.*")):
        if is_image_name(cand.name):
            return cand
    return None


def import_folder(src: str | Path, dest: str | Path, *, train_count: int = 3,
                  train_indices: str | list[int] | None = None, masks: str | Path | None = None,
                  categories: str | Path | None = None, category: str | None = None,
                  skip_bad: bool = False, name: str | None = None,
                  progress: Callable[[str], None] | None = None,
                  only: list[str] | None = None) -> ImportResult:
    """``only``: import just these instance folders of SRC (a converter's selection)."""
    src, dest = Path(src), Path(dest)
    if not src.is_dir():
        raise DatasetError(f"import source {src}: not a directory")
    if dest.exists():
        raise DatasetError(f"import destination {dest} already exists: choose a new path or "
                           "delete it (nothing was changed)")
    masks_dir = Path(masks) if masks else None
    if masks_dir is not None and not masks_dir.is_dir():
        raise DatasetError(f"--masks {masks_dir}: not a directory")
    indices = _parse_indices(train_indices)
    if train_count < 1 and indices is None:
        raise DatasetError(f"--train-count {train_count}: must be >= 1")
    if categories is None and category is None and (src / "prompts_and_classes.txt").is_file():
        categories = src / "prompts_and_classes.txt"
    cat_map = read_category_map(categories) if categories else {}

    inst_dirs = sorted((d for d in src.iterdir() if d.is_dir() and not d.name.startswith(".")
                        and (only is None or d.name in only)), key=lambda d: natural_key(d.name))
    if not inst_dirs:
        raise DatasetError(f"import source {src}: no instance sub-folders (expected SRC/<instance>/<image>)")
    result = ImportResult(dest, 0, 0, 0, 0)
    bad_names = [(d.name, check_name(d.name)) for d in inst_dirs]
    errors = [f"{src / n}: {b[1]}" for n, b in bad_names if b and b[0] == "error"]
    if errors:
        raise DatasetError("cannot import:\n" + "\n".join(errors) + "\nrename those folders")

    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        info: dict = {"classes": [], "class_to_idx": {}, "class_to_sc": {}, "source": str(src)}
        for d in inst_dirs:
            files = sorted((f for f in d.iterdir() if f.is_file() and is_image_name(f.name)),
                           key=lambda f: natural_key(f.name))
            good: list[Path] = []
            for f in files:
                try:
                    decode_image(f.read_bytes(), str(f))
                    good.append(f)
                except DatasetError as exc:
                    if not skip_bad:
                        raise DatasetError(f"{exc} (import stopped, nothing written; pass "
                                           "--skip-bad to leave such files out)") from None
                    result.skipped.append(str(exc))
            if not good:
                result.notes.append(f"{d.name}: no readable images, instance left out")
                continue
            if indices is not None:
                out_of_range = [i for i in indices if i >= len(good)]
                if out_of_range:
                    raise DatasetError(f"{d}: --train-indices {out_of_range} out of range "
                                       f"({len(good)} images)")
                train = [good[i] for i in indices]
            else:
                train = good[:train_count]
            test = [f for f in good if f not in train]
            if not test:
                result.notes.append(f"{d.name}: all {len(good)} images used for training, no test images")
            cat = category or cat_map.get(d.name) or "object"
            if cat_map and d.name not in cat_map and not category:
                result.notes.append(f"{d.name}: not in the category file, category 'object'")
            for split, chosen in (("train", train), ("test", test)):
                for f in chosen:
                    out = tmp / split / d.name / f.name
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(f, out)
                    m = _mask_for(masks_dir, d.name, f.name)
                    if m is not None:
                        arr = np.asarray(decode_image(m.read_bytes(), str(m)).convert("L")) > 0
                        mout = tmp / f"{split}_masks" / d.name / (f.stem + ".png")
                        mout.parent.mkdir(parents=True, exist_ok=True)
                        Image.fromarray((arr * 255).astype(np.uint8)).save(mout)
                        result.masks += 1
                    elif masks_dir is not None:
                        result.notes.append(f"{d.name}/{f.name}: no mask in {masks_dir}")
            result.instances += 1
            result.train_images += len(train)
            result.test_images += len(test)
            info["classes"].append(d.name)
            info["class_to_sc"][d.name] = cat
            if progress:
                progress(f"imported {d.name}: {len(train)} train, {len(test)} test ({cat})")
        if not result.instances:
            raise DatasetError(f"import source {src}: no readable images in any instance folder")
        info["class_to_idx"] = {n: i for i, n in enumerate(info["classes"])}
        info["import"] = {"train_count": train_count, "train_indices": indices,
                          "masks": str(masks_dir) if masks_dir else None}
        (tmp / f"{name or dest.name}_info.json").write_text(json.dumps(info, indent=1))
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return result
