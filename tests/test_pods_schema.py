"""`persrep data pods` against the published PODS parquet schema (Hugging Face chaenayo/PODS):
columns image / mask (HF Image structs {bytes, path}), label, scene_type; splits train /
test / test_dense (data/<split>-NNNNN-of-NNNNN.parquet); the four scenes; test_dense with masks;
the val/test split of the objects from the released pods_info.json."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from persrep.cli import main
from persrep.data.layout import SCENES, open_dataset, select_instances

# the published features (README dataset_info) as the datasets library writes them
HF_FEATURES = {"image": {"_type": "Image"}, "mask": {"_type": "Image"},
               "label": {"dtype": "string", "_type": "Value"},
               "scene_type": {"dtype": "string", "_type": "Value"}}
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
SCHEMA = pa.schema([("image", IMAGE), ("mask", IMAGE), ("label", pa.string()), ("scene_type", pa.string())],
                   metadata={"huggingface": json.dumps({"info": {"features": HF_FEATURES}})})
OBJECTS = {"mugs_red": ("mug", "val"), "mugs_blue": ("mug", "test"), "bottles_ai2": ("bottle", "test")}


def _enc(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def write_pods(root: Path, rng=np.random.default_rng(0), bad_scene: str | None = None,
               dense_mask: bool = True) -> Path:
    (root / "data").mkdir(parents=True)
    m = np.zeros((32, 40), np.uint8)
    m[8:24, 10:30] = 255
    img = lambda: {"bytes": _enc(rng.integers(0, 255, (32, 40, 3), np.uint8), "JPEG"), "path": None}
    mask = lambda: {"bytes": _enc(m, "PNG"), "path": None}
    rows = {"train": [(o, "train") for o in OBJECTS for _ in range(3)],
            "test": [(o, s) for o in OBJECTS for s in SCENES for _ in range(2)],
            "test_dense": [(o, s) for o in OBJECTS for s in SCENES]}
    if bad_scene:
        rows["test"][0] = (rows["test"][0][0], bad_scene)
    for split, rr in rows.items():
        has_mask = dense_mask or split != "test_dense"
        table = pa.Table.from_pylist([{"image": img(), "mask": mask() if has_mask else None,
                                       "label": o, "scene_type": s} for o, s in rr], schema=SCHEMA)
        pq.write_table(table, root / "data" / f"{split}-00000-of-00001.parquet", row_group_size=4)
    info = {"classes": sorted(OBJECTS), "class_to_idx": {o: i for i, o in enumerate(sorted(OBJECTS))},
            "class_to_sc": {o: c for o, (c, _) in OBJECTS.items()},
            "class_to_split": {o: sp for o, (_, sp) in OBJECTS.items()}}
    (root / "pods_info.json").write_text(json.dumps(info))
    return root


def test_published_schema_converts_with_scenes_dense_masks_and_split(tmp_path, capsys):
    src = write_pods(tmp_path / "PODS")
    assert pq.read_schema(src / "data" / "test-00000-of-00001.parquet").names == ["image", "mask", "label", "scene_type"]
    dest = tmp_path / "pods"
    assert main(["data", "pods", str(src), str(dest)]) == 0
    ds = open_dataset(str(dest))
    assert ds.names == sorted(OBJECTS)
    assert {n: i.category for n, i in ds.instances.items()} == {o: c for o, (c, _) in OBJECTS.items()}
    assert ds.splits == {o: sp for o, (_, sp) in OBJECTS.items()}
    assert select_instances(ds, split="val") == ["mugs_red"]
    a = ds.instances["mugs_blue"]
    assert len(a.train) == 3 and len(a.test) == 8 and len(a.test_dense) == 4
    assert sorted(ds.scene_of(r) for r in a.test) == sorted(s for s in SCENES for _ in range(2))
    assert ds.has_masks("train") and ds.has_masks("test") and ds.has_masks("test_dense")
    assert ds.read_mask(a.test_dense[0]).sum() == 16 * 20
    capsys.readouterr()
    assert main(["data", "check", str(dest), "--dense"]) == 0, capsys.readouterr().out


def test_unknown_scene_and_dense_row_without_mask_are_refused(tmp_path, capsys):
    src = write_pods(tmp_path / "a", bad_scene="outdoor")
    assert main(["data", "pods", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "test-00000-of-00001.parquet: row 0 of mugs_red: scene_type 'outdoor' is not one of" in err
    assert not (tmp_path / "out").exists()
    src = write_pods(tmp_path / "b", dense_mask=False)
    assert main(["data", "pods", str(src), str(tmp_path / "out")]) == 2
    assert "test_dense row without a mask" in capsys.readouterr().err


def test_info_without_an_object_is_refused(tmp_path, capsys):
    src = write_pods(tmp_path / "a")
    info = json.loads((src / "pods_info.json").read_text())
    del info["class_to_split"]["mugs_blue"]
    (src / "pods_info.json").write_text(json.dumps(info))
    assert main(["data", "pods", str(src), str(tmp_path / "out")]) == 2
    assert "class_to_split has no entry for ['mugs_blue']" in capsys.readouterr().err
