"""Read PODS as published (parquet: image, mask, label, scene_type) into the reference layout.

The published export (``data/{train,test,test_dense}-*.parquet``) stores images as Hugging Face
image structs ``{bytes, path}`` (plain binary columns are accepted too), ``label`` as the object
name (``bottles_adobe``; the category is the part before the first ``_``), and ``scene_type``
(``train`` for the train split; one of the four PODS scenes for test rows).

:func:`materialize_pods` writes the reference layout once (atomically: temp dir + rename) with
masks and ``image_to_scene``, so every stage reads PODS through the same :mod:`layout` code.
Only one row group is decoded at a time: the 1.2 GB test split never sits in memory whole.

Checked against the published schema: columns ``image``, ``mask``, ``label``, ``scene_type``;
train rows have scene ``train``, test rows one of the four PODS scenes (anything else is an error
naming the file and row); every ``test_dense`` row has a mask. The val/test split of the objects
is not in the parquet: it is ``class_to_split`` of the released ``pods_info.json`` (the direct
download), read from ``info=`` or ``SRC/pods_info.json`` when present, with its ``class_to_sc``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from persrep.data.layout import SCENES, DatasetError, decode_image

SPLIT_PREFIXES = ("train", "test_dense", "test")  # test_dense before test: prefix match
REQUIRED = ("image", "label")


def find_pods_files(src: str | Path) -> dict[str, list[Path]]:
    """``{split: [parquet files]}`` under src or src/data; empty when src is not a PODS export."""
    src = Path(src)
    files = sorted(src.glob("*.parquet")) + sorted((src / "data").glob("*.parquet"))
    out: dict[str, list[Path]] = {}
    for f in files:
        for split in SPLIT_PREFIXES:
            if f.name.startswith(split + "-") or f.name == f"{split}.parquet":
                out.setdefault(split, []).append(f)
                break
    return out


def is_pods_export(src: str | Path) -> bool:
    return bool(find_pods_files(src).get("train"))


def _image_bytes(cell: object, where: str) -> bytes | None:
    if cell is None:
        return None
    if isinstance(cell, dict):
        cell = cell.get("bytes")
    if isinstance(cell, (bytes, bytearray)):
        return bytes(cell)
    raise DatasetError(f"{where}: image cell is {type(cell).__name__}, expected bytes or "
                       "{bytes, path}")


def category_of(label: str) -> str:
    return label.split("_", 1)[0] if "_" in label else label


def read_released_info(src: str | Path, info: str | Path | None) -> dict:
    """``class_to_split`` / ``class_to_sc`` of the released ``pods_info.json`` ({} when absent)."""
    path = Path(info) if info else Path(src) / "pods_info.json"
    if not path.is_file():
        if info:
            raise DatasetError(f"--info {path}: not found (the released pods_info.json)")
        return {}
    try:
        doc = json.loads(path.read_text())
    except ValueError as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from None
    split = doc.get("class_to_split", {}) if isinstance(doc, dict) else None
    if not isinstance(split, dict) or any(v not in ("val", "test") for v in split.values()):
        raise DatasetError(f"{path}: class_to_split must map each object to 'val' or 'test'")
    return {"class_to_split": split, "class_to_sc": doc.get("class_to_sc", {}) or {}, "path": str(path)}


def materialize_pods(src: str | Path, dest: str | Path,
                     progress: Callable[[str], None] | None = None,
                     info_file: str | Path | None = None) -> Path:
    """Write PODS parquet (``src``) as the reference layout at ``dest``; return dest."""
    dest = Path(dest)
    if (dest / "pods_info.json").is_file():
        return dest
    released = read_released_info(src, info_file)
    files = find_pods_files(src)
    if "train" not in files:
        raise DatasetError(f"{src}: no train-*.parquet found: expected the PODS export "
                           "(data/train-*.parquet, data/test-*.parquet, data/test_dense-*.parquet)")
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    info: dict = {"classes": [], "class_to_idx": {}, "class_to_sc": {}, "image_to_scene": {},
                  "source": str(src)}
    counters: dict[tuple[str, str], int] = {}
    try:
        for split, paths in files.items():
            for path in paths:
                pf = pq.ParquetFile(path)
                missing = [c for c in REQUIRED if c not in pf.schema_arrow.names]
                if missing:
                    raise DatasetError(f"{path}: missing column(s) {missing}; PODS needs image, "
                                       "mask, label, scene_type")
                cols = [c for c in ("image", "mask", "label", "scene_type") if c in pf.schema_arrow.names]
                for rg in range(pf.num_row_groups):
                    table = pf.read_row_group(rg, columns=cols).to_pylist()
                    for row in table:
                        _write_row(row, split, tmp, counters, info, str(path))
                    if progress:
                        progress(f"PODS {split}: {path.name} row group {rg + 1}/{pf.num_row_groups}")
        info["classes"] = sorted(info["class_to_sc"])
        info["class_to_idx"] = {n: i for i, n in enumerate(info["classes"])}
        if released:
            missing = [c for c in info["classes"] if c not in released["class_to_split"]]
            if missing:
                raise DatasetError(f"{released['path']}: class_to_split has no entry for {missing[:5]} "
                                   "(objects in the parquet): use the pods_info.json of the same release")
            info["class_to_split"] = {c: released["class_to_split"][c] for c in info["classes"]}
            info["class_to_sc"] = {c: str(released["class_to_sc"].get(c, info["class_to_sc"][c]))
                                   for c in info["classes"]}
        (tmp / "pods_info.json").write_text(json.dumps(info, indent=1))
        if dest.exists():
            raise DatasetError(f"{dest} exists but is not a finished PODS copy: delete it and retry")
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _write_row(row: dict, split: str, root: Path, counters: dict, info: dict, where: str) -> None:
    label = str(row["label"])
    if not label or "/" in label or ".." in label:
        raise DatasetError(f"{where}: unsafe label {label!r}")
    n = counters.get((split, label), 0)
    counters[(split, label)] = n + 1
    img = _image_bytes(row["image"], where)
    if img is None:
        raise DatasetError(f"{where}: row {n} of {label} has no image")
    fmt = (Image.open(io.BytesIO(img)).format or "PNG").lower()
    ext = ".jpg" if fmt == "jpeg" else f".{fmt}"
    scene = str(row.get("scene_type") or "")
    if split == "test" and scene not in SCENES:
        raise DatasetError(f"{where}: row {n} of {label}: scene_type {scene!r} is not one of the "
                           f"PODS scenes {list(SCENES)}")
    if split == "train" and scene not in ("", "train"):
        raise DatasetError(f"{where}: row {n} of {label}: scene_type {scene!r} in the train split "
                           "(the published export has 'train')")
    if split == "test_dense" and row.get("mask") is None:
        raise DatasetError(f"{where}: row {n} of {label}: test_dense row without a mask (dense "
                           "tasks need one per image)")
    stem = f"{scene}_{n:04d}" if split != "train" and scene else f"{n:04d}"
    rel = f"{split}/{label}/{stem}{ext}"
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(img)
    mask = _image_bytes(row.get("mask"), where)
    if mask is not None:
        arr = np.asarray(decode_image(mask, f"{where} mask of {rel}").convert("L")) > 0
        mrel = f"{split}_masks/{label}/{stem}.png"
        (root / mrel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((arr * 255).astype(np.uint8)).save(root / mrel)
    if split == "test" and scene:
        info["image_to_scene"][rel] = scene
    elif split == "test_dense" and scene in SCENES:
        info.setdefault("dense_image_to_scene", {})[rel] = scene
    info["class_to_sc"][label] = category_of(label)
