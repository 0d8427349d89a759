"""``persrep data df2 SRC DEST``: DeepFashion2 -> the reference layout (one instance per garment).

DeepFashion2's released layout (per split): ``image/NNNNNN.jpg`` and ``annos/NNNNNN.json``; each
annotation has ``source`` (``shop`` | ``user``), ``pair_id`` and items ``item1``, ``item2``, ...
with ``category_name``, ``style``, ``bounding_box`` ``[x1, y1, x2, y2]`` and ``segmentation``
(polygons ``[[x, y, x, y, ...], ...]``). A garment is identified by (``pair_id``, ``style``) with
``style > 0`` (style 0 items cannot be matched across images and are left out).

Conversion (the paper's shop -> consumer shift; its exact mapping was never released):
- an instance = one garment of the chosen categories (default: the shirt categories ``short
  sleeve top`` and ``long sleeve top``) with at least ``min_shop`` shop and ``min_user`` user images;
- train = its first 3 **shop** images by image id; test = all its **user** images;
- masks rasterised from the item's polygons with pycocotools; the annotation's box is kept in the
  info file (``image_to_box``); image bytes are copied unchanged;
- the info file records where everything came from (``instance_to_source``: pair_id, style,
  DF2 category; ``image_to_source``: the original image file), so any result can be traced back.

Deterministic (sorted ids, no randomness). Every annotation is parsed and checked before anything
is written; DEST is built under a temporary name and renamed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from persrep.data.importer import ImportResult
from persrep.data.layout import DatasetError, natural_key

SHIRT_CATEGORIES = ("short sleeve top", "long sleeve top")
TRAIN_COUNT = 3


@dataclass
class Item:
    image_id: str
    source: str  # shop | user
    category: str
    box: list[float]
    polygons: list[list[float]]


def _parse(path: Path, categories: set[str]) -> tuple[int, list[tuple[int, Item]]]:
    """(pair_id, [(style, item)]) of one annotation file; errors name the file and the field."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc}): re-extract the DF2 annos/ folder") from None
    if not isinstance(doc, dict):
        raise DatasetError(f"{path}: expected a JSON object with source, pair_id, item1, ...")
    source = doc.get("source")
    if source not in ("shop", "user"):
        raise DatasetError(f"{path}: field 'source' is {source!r}, expected 'shop' or 'user'")
    pair_id = doc.get("pair_id")
    if not isinstance(pair_id, int):
        raise DatasetError(f"{path}: field 'pair_id' is {pair_id!r}, expected an integer")
    out = []
    for key in sorted((k for k in doc if k.startswith("item")), key=natural_key):
        it = doc[key]
        if not isinstance(it, dict):
            raise DatasetError(f"{path}: field {key!r} must be an object")
        style = it.get("style")
        if not isinstance(style, int):
            raise DatasetError(f"{path}: {key}.style is {style!r}, expected an integer (0 = unmatched)")
        if style <= 0 or it.get("category_name") not in categories:
            continue
        box = it.get("bounding_box")
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            raise DatasetError(f"{path}: {key}.bounding_box is {box!r}, expected [x1, y1, x2, y2]")
        polys = it.get("segmentation")
        if not (isinstance(polys, list) and polys and all(isinstance(p, list) for p in polys)):
            raise DatasetError(f"{path}: {key}.segmentation must be a list of polygons [[x, y, ...], ...]")
        polys = [[float(v) for v in p] for p in polys if len(p) >= 6]  # >= 3 points
        if not polys:
            raise DatasetError(f"{path}: {key}.segmentation has no polygon with 3 or more points")
        out.append((style, Item(path.stem, source, str(it["category_name"]), [float(v) for v in box], polys)))
    return pair_id, out


def rasterise(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """The union of the polygons as a boolean mask (pycocotools, COCO's own rasteriser)."""
    from pycocotools import mask as mask_utils

    rles = mask_utils.frPyObjects(polygons, height, width)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def _slug(text: str) -> str:
    return "_".join(text.lower().split())


def convert_df2(src: str | Path, dest: str | Path, *, categories: str | list[str] | None = None,
                min_shop: int = TRAIN_COUNT, min_user: int = 3, max_instances: int | None = None,
                progress: Callable[[str], None] | None = None) -> ImportResult:
    src, dest = Path(src), Path(dest)
    cats = ([c.strip() for c in categories.split(",") if c.strip()] if isinstance(categories, str)
            else list(categories or SHIRT_CATEGORIES))
    if min_shop < TRAIN_COUNT:
        raise DatasetError(f"--min-shop {min_shop}: must be >= {TRAIN_COUNT} (3 shop images train)")
    if min_user < 1:
        raise DatasetError(f"--min-user {min_user}: must be >= 1 (user images are the test set)")
    img_dir, ann_dir = src / "image", src / "annos"
    if not img_dir.is_dir() or not ann_dir.is_dir():
        raise DatasetError(f"{src}: expected DeepFashion2's image/ and annos/ folders (one split, e.g. "
                           "validation/): point SRC at the folder that holds both")
    if dest.exists():
        raise DatasetError(f"{dest} already exists: choose a new path or delete it (nothing was changed)")
    ann_files = sorted(ann_dir.glob("*.json"), key=lambda p: natural_key(p.name))
    if not ann_files:
        raise DatasetError(f"{ann_dir}: no NNNNNN.json annotation files")
    garments: dict[tuple[int, int], list[Item]] = {}
    for i, f in enumerate(ann_files):
        pair_id, items = _parse(f, set(cats))
        for style, item in items:
            garments.setdefault((pair_id, style), []).append(item)
        if progress and i % 5000 == 0:
            progress(f"DF2: read {i + 1}/{len(ann_files)} annotations")
    chosen = []
    for gid in sorted(garments):
        items = garments[gid]
        shop = sorted((it for it in items if it.source == "shop"), key=lambda it: natural_key(it.image_id))
        user = sorted((it for it in items if it.source == "user"), key=lambda it: natural_key(it.image_id))
        if len(shop) >= min_shop and len(user) >= min_user:
            chosen.append((gid, shop[:TRAIN_COUNT], user))
    if max_instances:
        chosen = chosen[:max_instances]
    if not chosen:
        raise DatasetError(f"{src}: no garment of {cats} has >= {min_shop} shop and >= {min_user} user "
                           f"images ({len(garments)} garments with style > 0 seen): lower --min-user / "
                           "--min-shop or choose other --categories")
    for _, train, test in chosen:  # every image exists before anything is written
        for it in train + test:
            if not (img_dir / f"{it.image_id}.jpg").is_file():
                raise DatasetError(f"{img_dir / (it.image_id + '.jpg')}: missing, but annos/{it.image_id}.json "
                                   "names it: re-extract DF2's image/ folder")
    default_cats = set(cats) <= set(SHIRT_CATEGORIES)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    info: dict = {"classes": [], "class_to_idx": {}, "class_to_sc": {}, "image_to_box": {},
                  "image_to_source": {}, "instance_to_source": {}, "source": str(src),
                  "df2": {"categories": cats, "min_shop": min_shop, "min_user": min_user,
                          "max_instances": max_instances, "garments_seen": len(garments)}}
    res = ImportResult(dest, 0, 0, 0, 0)
    try:
        for n, ((pair_id, style), train, test) in enumerate(chosen):
            df2_cat = Counter(it.category for it in train + test).most_common(1)[0][0]
            name = f"{_slug(df2_cat)}_{pair_id:06d}_s{style}"
            for split, items in (("train", train), ("test", test)):
                for it in items:
                    srcf = img_dir / f"{it.image_id}.jpg"
                    rel = f"{split}/{name}/{it.image_id}.jpg"
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(srcf, tmp / rel)
                    with Image.open(srcf) as im:
                        w, h = im.size
                    m = rasterise(it.polygons, h, w)
                    mrel = f"{split}_masks/{name}/{it.image_id}.png"
                    (tmp / mrel).parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray((m * 255).astype(np.uint8)).save(tmp / mrel)
                    info["image_to_box"][rel] = it.box
                    info["image_to_source"][rel] = f"image/{it.image_id}.jpg"
                    res.masks += 1
            info["classes"].append(name)
            info["class_to_sc"][name] = "shirt" if default_cats else _slug(df2_cat)
            info["instance_to_source"][name] = {"pair_id": pair_id, "style": style,
                                                "category_name": df2_cat}
            res.instances += 1
            res.train_images += len(train)
            res.test_images += len(test)
            if progress and n % 20 == 0:
                progress(f"DF2: wrote {n + 1}/{len(chosen)} garments")
        info["class_to_idx"] = {c: i for i, c in enumerate(info["classes"])}
        (tmp / "df2_info.json").write_text(json.dumps(info, indent=1))
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    res.notes.append(f"{len(chosen)} of {len(garments)} garments (style > 0, {', '.join(cats)}) had "
                     f">= {min_shop} shop and >= {min_user} user images")
    return res
