"""``persrep data dogs SRC DEST``: DogFaceNet -> the reference layout (category ``dog``).

DogFaceNet is released as one folder of aligned face crops per dog id (``SRC/<id>/<image>``).
Dogs with at least ``min_images`` images are eligible; the ``max_dogs`` with the most images are
kept (ties by id; the paper keeps 80); each keeps its first 3 images (natural name order) as
train and the rest as test. Deterministic. Masks (the paper annotated its own) are imported from
a folder mirroring SRC (``MASKS/<id>/<stem>.png``) when given; the import itself is
``data import`` (validated, atomic), restricted to the selected dogs. The info file
(``dogs_info.json``) records the source and the selection (eligible / kept dogs and the rule).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from persrep.data.importer import ImportResult, import_folder
from persrep.data.layout import DatasetError, is_image_name, natural_key

CATEGORY = "dog"


def select_dogs(src: Path, min_images: int, max_dogs: int | None) -> tuple[list[str], int]:
    """(kept dog ids, number eligible): most images first, ties by natural id order."""
    counts = {d.name: sum(1 for f in d.iterdir() if f.is_file() and is_image_name(f.name))
              for d in src.iterdir() if d.is_dir() and not d.name.startswith(".")}
    eligible = [n for n, c in counts.items() if c >= min_images]
    ranked = sorted(eligible, key=lambda n: (-counts[n], natural_key(n)))
    return sorted(ranked[:max_dogs] if max_dogs else ranked, key=natural_key), len(eligible)


def convert_dogs(src: str | Path, dest: str | Path, *, masks: str | Path | None = None,
                 min_images: int = 5, max_dogs: int | None = 80, train_count: int = 3,
                 progress: Callable[[str], None] | None = None) -> ImportResult:
    src, dest = Path(src), Path(dest)
    if not src.is_dir():
        raise DatasetError(f"{src}: not a directory (expected DogFaceNet's <dog id>/<image> folders)")
    if min_images <= train_count:
        raise DatasetError(f"--min-images {min_images}: must exceed --train-count {train_count} "
                           "(every dog needs test images)")
    kept, eligible = select_dogs(src, min_images, max_dogs)
    if not kept:
        raise DatasetError(f"{src}: no dog folder has >= {min_images} images: lower --min-images")
    res = import_folder(src, dest, train_count=train_count, masks=masks, category=CATEGORY,
                        name="dogs", progress=progress, only=kept)
    info_path = dest / "dogs_info.json"
    info = json.loads(info_path.read_text())
    info["dogs"] = {"min_images": min_images, "max_dogs": max_dogs, "eligible": eligible,
                    "kept": len(kept), "rule": "most images first, ties by id; first "
                    f"{train_count} by name train, the rest test"}
    tmp = info_path.with_name(f".{info_path.name}.tmp")
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, info_path)  # the data set stays complete and valid at every moment
    res.notes.append(f"{len(kept)} of {eligible} dogs with >= {min_images} images kept")
    return res
