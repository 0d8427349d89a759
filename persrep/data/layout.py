"""Instance data sets in the reference layout, from a local directory or ``s3://``.

Layout (the reference layout; ../shared/docs/REFERENCE.md, not in this repository)::

    train/<instance>/*.jpg            exactly 3 in the benchmarks
    test/<instance>/*.jpg
    train_masks/ test_masks/          optional, mirroring train/ test/ (binary, foreground > 0)
    test_dense/ test_dense_masks/     optional (PODS: 12 images per object)
    <name>_info.json                  optional: classes, class_to_idx, class_to_sc, class_to_split

persrep extension (written by the toy world and ``data import``; read when present):
``image_to_scene`` in the info file maps a test image's relative path to its PODS scene
(in_distribution / pose / distractors / pose_and_distractors). A mask mirrors its image by
relative path with any image extension (``train/a/0.jpg`` -> ``train_masks/a/0.png``).
"""

from __future__ import annotations

import io
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from persrep.config import content_key
from persrep.storage import MANIFEST, Storage, StorageError
from persrep.errors import DatasetError  # noqa: F401 (re-exported)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
SPLITS = ("train", "test", "test_dense")
SCENES = ("in_distribution", "pose", "distractors", "pose_and_distractors")
MAX_IMAGE_PIXELS = 64_000_000  # refuse decompression bombs well before PIL's own 179 MP error
MIN_SIDE = 8  # smaller images carry no usable object detail (a 1x1 "photo" is an error)
DATA_PREFIX = "@data/"  # a settings path relative to the data set root


def resolve_data_path(path: str, data_root: str | None, setting: str = "generator.cut_paste.backgrounds",
                      absolute: bool = False) -> str:
    """``@data/x`` -> ``<data_root>/x`` (local or ``s3://``). Any other path is returned unchanged,
    or with ``absolute`` (what workers receive) a local one is made absolute against the cwd."""
    if path.startswith(DATA_PREFIX):
        if not data_root:
            raise ValueError(f"{setting}={path!r} is relative to the data set root, but no data root "
                             "is known: pass data_root (the data set directory or s3:// URI) to the "
                             "generator, or give a full folder path")
        return f"{data_root.rstrip('/')}/{path[len(DATA_PREFIX):].lstrip('/')}"
    if not absolute or "://" in path:
        return path
    return str(Path(path).expanduser().absolute())


def natural_key(name: str) -> list[object]:
    """Sort ``2.jpg`` before ``10.jpg`` ("first N by name" means natural order)."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTS) and not name.startswith(".")


@dataclass
class Instance:
    name: str
    category: str
    images: dict[str, list[str]] = field(default_factory=dict)  # split -> relative paths

    @property
    def train(self) -> list[str]:
        return self.images.get("train", [])

    @property
    def test(self) -> list[str]:
        return self.images.get("test", [])

    @property
    def test_dense(self) -> list[str]:
        return self.images.get("test_dense", [])


@dataclass
class InstanceDataset:
    """A listing of a data set (no pixels read yet) plus readers for its images and masks."""

    root: str
    instances: dict[str, Instance]
    masks: dict[str, str]  # image rel path -> mask rel path
    scenes: dict[str, str]  # test image rel path -> scene
    splits: dict[str, str]  # instance -> val/test (PODS)
    info_file: str | None
    listing_key: str
    storage: Storage
    uncategorised: frozenset[str] = frozenset()  # instances missing from class_to_sc

    # -- views --------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return sorted(self.instances)

    @property
    def categories(self) -> list[str]:
        return sorted({i.category for i in self.instances.values()})

    def instances_of(self, category: str) -> list[str]:
        return sorted(n for n, i in self.instances.items() if i.category == category)

    def has_masks(self, split: str) -> bool:
        paths = [p for i in self.instances.values() for p in i.images.get(split, [])]
        return bool(paths) and all(p in self.masks for p in paths)

    def test_pool(self, split: str = "test") -> list[tuple[str, str]]:
        """(instance, image rel path) for every test image of every instance, in a fixed order."""
        return [(n, p) for n in self.names for p in self.instances[n].images.get(split, [])]

    def scene_of(self, rel: str) -> str | None:
        return self.scenes.get(rel)

    def subset(self, names: list[str]) -> "InstanceDataset":
        missing = sorted(set(names) - set(self.instances))
        if missing:
            raise DatasetError(f"{self.root}: no instance(s) {missing}; have {self.names[:20]}")
        keep = {n: self.instances[n] for n in names}
        return InstanceDataset(self.root, keep, self.masks, self.scenes, self.splits,
                               self.info_file, content_key(self.listing_key, sorted(names)),
                               self.storage, self.uncategorised & set(names))

    # -- pixels ---------------------------------------------------------------------------------
    def read_bytes(self, rel: str) -> bytes:
        return self.storage.read_bytes(rel)

    def read_image(self, rel: str) -> Image.Image:
        """Decode an image as RGB (any mode converted; alpha composited on white)."""
        return decode_image(self.read_bytes(rel), self.storage.uri(rel))

    def read_mask(self, rel: str) -> np.ndarray | None:
        """The boolean mask of an image (foreground > 0), or None when the data set has none."""
        mrel = self.masks.get(rel)
        if mrel is None:
            return None
        return decode_mask(self.read_bytes(mrel), self.storage.uri(mrel))


def decode_image(data: bytes, where: str) -> Image.Image:
    if not data:
        raise DatasetError(f"{where}: empty file (0 bytes): replace or remove it")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise DatasetError(f"{where}: {img.width}x{img.height} pixels exceeds the "
                                   f"{MAX_IMAGE_PIXELS:,}-pixel limit (decompression-bomb guard): "
                                   "downscale it")
            img.load()
    except DatasetError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DatasetError(f"{where}: image too large (decompression-bomb guard): downscale it") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types; one line for the user
        raise DatasetError(f"{where}: not a readable image ({type(exc).__name__}: "
                           f"{str(exc)[:80]}): replace or remove it") from None
    if min(img.size) < MIN_SIDE:
        raise DatasetError(f"{where}: image is {img.width}x{img.height}, below {MIN_SIDE} px: "
                           "use a real photo of the object")
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() or 1.0
        return Image.fromarray((arr / hi * 255).astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


def decode_mask(data: bytes, where: str) -> np.ndarray:
    img = decode_image(data, where)
    return np.asarray(img.convert("L")) > 0


def _read_info(storage: Storage, files: list[str]) -> tuple[dict, str | None]:
    infos = [f for f in files if "/" not in f and f.endswith("_info.json")]
    if not infos:
        return {}, None
    if len(infos) > 1:
        raise DatasetError(f"{storage.root}: several info files {infos}: keep one <name>_info.json")
    try:
        info = json.loads(storage.read_bytes(infos[0]))
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{storage.uri(infos[0])}: not valid JSON ({exc}): fix or remove it") from None
    if not isinstance(info, dict):
        raise DatasetError(f"{storage.uri(infos[0])}: must be a JSON object")
    return info, infos[0]


def open_dataset(path: str, s3_endpoint: str | None = None) -> InstanceDataset:
    """List a data set in the reference layout (local path or s3:// URI). Reads no pixels."""
    storage = Storage(path, s3_endpoint)
    try:
        listing = storage.list_files()
    except StorageError as exc:
        raise DatasetError(str(exc)) from None
    if not listing:
        raise DatasetError(f"{path}: empty or missing data set directory: give a directory with "
                           "train/<instance>/ images (see `persrep data import --help`)")
    files = [f for f, _ in listing]
    info, info_file = _read_info(storage, files)
    by_split: dict[str, dict[str, list[str]]] = {s: {} for s in SPLITS}
    mask_files: dict[str, dict[str, str]] = {s: {} for s in SPLITS}  # split -> stem rel -> mask rel
    for rel in files:
        parts = PurePosixPath(rel).parts
        if len(parts) != 3 or not is_image_name(parts[2]):
            continue
        top, inst, fname = parts
        if top in by_split:
            by_split[top].setdefault(inst, []).append(rel)
        elif top.endswith("_masks") and top[: -len("_masks")] in by_split:
            split = top[: -len("_masks")]
            mask_files[split][f"{split}/{inst}/{PurePosixPath(fname).stem}"] = rel
    if not by_split["train"]:
        raise DatasetError(f"{path}: no train/<instance>/<image> files found: the reference layout "
                           "needs train/ and test/ folders with one sub-folder per instance "
                           "(use `persrep data import SRC DEST` for a folder-per-instance collection)")
    class_to_sc = info.get("class_to_sc", {})
    names = sorted(set(by_split["train"]) | set(by_split["test"]) | set(by_split["test_dense"]))
    instances: dict[str, Instance] = {}
    masks: dict[str, str] = {}
    for name in names:
        imgs = {s: sorted(by_split[s].get(name, []), key=natural_key) for s in SPLITS}
        instances[name] = Instance(name, str(class_to_sc.get(name, "object")),
                                   {s: v for s, v in imgs.items() if v})
        for split, rels in imgs.items():
            for rel in rels:
                m = mask_files[split].get(str(PurePosixPath(rel).with_suffix("")))
                if m:
                    masks[rel] = m
    scenes = {k: str(v) for k, v in info.get("image_to_scene", {}).items()}
    splits = {k: str(v) for k, v in info.get("class_to_split", {}).items()}
    # the data's identity: its files (names, sizes), not the manifest that published them on S3 (its
    # size varies with its timestamp), so the same data keys the same units on every storage root
    key = content_key({"root_listing": [(f, n) for f, n in listing if f != MANIFEST]})
    return InstanceDataset(path, instances, masks, scenes, splits, info_file, key, storage,
                           frozenset(set(names) - set(class_to_sc)))


def select_instances(ds: InstanceDataset, names: list[str] | None = None,
                     split: str = "all", max_instances: int | None = None) -> list[str]:
    """The instances a run works on: an explicit list, a PODS split, and/or the first N."""
    chosen = list(names) if names else ds.names
    unknown = sorted(set(chosen) - set(ds.instances))
    if unknown:
        raise DatasetError(f"data.instances: unknown instance(s) {unknown[:10]} in {ds.root}; "
                           f"available: {ds.names[:10]}{' ...' if len(ds.names) > 10 else ''}")
    if split != "all":
        if not ds.splits:
            raise DatasetError(f"data.split={split}: {ds.root} has no class_to_split in its info "
                               "file; use data.split=all")
        chosen = [n for n in chosen if ds.splits.get(n) == split]
    if max_instances and len(chosen) > max_instances:
        # round-robin over categories, so "the first N" covers every category evenly
        by_cat: dict[str, list[str]] = {}
        for n in chosen:
            by_cat.setdefault(ds.instances[n].category, []).append(n)
        queues = [by_cat[c] for c in sorted(by_cat)]
        picked: list[str] = []
        while len(picked) < max_instances:
            for q in queues:
                if q and len(picked) < max_instances:
                    picked.append(q.pop(0))
        chosen = sorted(picked)
    if not chosen:
        raise DatasetError(f"{ds.root}: no instances selected (split={split}, instances={names})")
    return chosen
