"""DeepFashion2 and DogFaceNet converters on small data sets written in their original formats;
every converted set passes `persrep data check` clean (exit 0)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from persrep.cli import main
from persrep.data.check import check_dataset
from persrep.data.layout import DatasetError, open_dataset

W, H = 64, 48


def _jpg(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (H, W, 3), np.uint8)).save(path, quality=90)


def _item(cat: str, style: int, box, polys) -> dict:
    return {"category_name": cat, "category_id": 1 if cat == "short sleeve top" else 2, "style": style,
            "bounding_box": list(box), "segmentation": polys, "landmarks": [0] * 75,
            "occlusion": 1, "zoom_in": 1, "viewpoint": 2, "scale": 2}


SQUARE = [[10, 10, 30, 10, 30, 30, 10, 30]]          # 20 x 20 -> 400 px
TWO = [[40, 5, 60, 5, 60, 15, 40, 15], [40, 30, 50, 30, 50, 40]]  # a rectangle + a triangle


def write_df2(root: Path) -> Path:
    """DF2 layout: image/NNNNNN.jpg + annos/NNNNNN.json. Garments:
    pair 1 style 1 (short sleeve top): 4 shop + 2 user -> kept (train = first 3 shop);
    pair 1 style 2 (long sleeve top): 3 shop + 1 user -> dropped (min_user 2);
    pair 2 style 1 (trousers): not a shirt; style 0 items: never instances;
    pair 3 style 1 (long sleeve top): 3 shop + 3 user, one user image holds 2 items -> kept."""
    annos: list[dict] = [
        {"source": "shop", "pair_id": 1, "item1": _item("short sleeve top", 1, (10, 10, 30, 30), SQUARE)},
        {"source": "shop", "pair_id": 1, "item1": _item("short sleeve top", 1, (10, 10, 30, 30), SQUARE),
         "item2": _item("long sleeve top", 2, (40, 5, 60, 40), TWO)},
        {"source": "shop", "pair_id": 1, "item1": _item("short sleeve top", 1, (10, 10, 30, 30), SQUARE),
         "item2": _item("long sleeve top", 0, (40, 5, 60, 40), TWO)},  # style 0: not matchable
        {"source": "shop", "pair_id": 1, "item1": _item("short sleeve top", 1, (10, 10, 30, 30), SQUARE),
         "item2": _item("long sleeve top", 2, (40, 5, 60, 40), TWO)},
        {"source": "user", "pair_id": 1, "item1": _item("short sleeve top", 1, (40, 5, 60, 40), TWO)},
        {"source": "user", "pair_id": 1, "item1": _item("short sleeve top", 1, (10, 10, 30, 30), SQUARE),
         "item2": _item("long sleeve top", 2, (40, 5, 60, 40), TWO)},
        {"source": "shop", "pair_id": 1, "item1": _item("long sleeve top", 2, (40, 5, 60, 40), TWO)},
        {"source": "user", "pair_id": 2, "item1": _item("trousers", 1, (10, 10, 30, 30), SQUARE)},
        *[{"source": "shop", "pair_id": 3, "item1": _item("long sleeve top", 1, (10, 10, 30, 30), SQUARE)}
          for _ in range(3)],
        {"source": "user", "pair_id": 3, "item1": _item("long sleeve top", 1, (10, 10, 30, 30), SQUARE),
         "item2": _item("trousers", 1, (40, 5, 60, 40), TWO)},
        {"source": "user", "pair_id": 3, "item1": _item("long sleeve top", 1, (40, 5, 60, 40), TWO)},
        {"source": "user", "pair_id": 3, "item2": _item("long sleeve top", 1, (10, 10, 30, 30), SQUARE)},
    ]
    for i, a in enumerate(annos, start=1):
        _jpg(root / "image" / f"{i:06d}.jpg", i)
        (root / "annos").mkdir(parents=True, exist_ok=True)
        (root / "annos" / f"{i:06d}.json").write_text(json.dumps(a))
    return root


def test_df2_converts_garments_shop_train_user_test_with_polygon_masks(tmp_path, capsys):
    src = write_df2(tmp_path / "validation")
    dest = tmp_path / "df2"
    assert main(["data", "df2", str(src), str(dest), "--min-user", "2"]) == 0
    assert "2 instances (6 train, 5 test images, 11 masks)" in capsys.readouterr().out
    ds = open_dataset(str(dest))
    assert ds.names == ["long_sleeve_top_000003_s1", "short_sleeve_top_000001_s1"]
    a = ds.instances["short_sleeve_top_000001_s1"]
    assert a.train == [f"train/short_sleeve_top_000001_s1/{i:06d}.jpg" for i in (1, 2, 3)]  # first 3 shop
    assert a.test == [f"test/short_sleeve_top_000001_s1/{i:06d}.jpg" for i in (5, 6)]   # the user images
    assert ds.instances["long_sleeve_top_000003_s1"].test == [
        f"test/long_sleeve_top_000003_s1/{i:06d}.jpg" for i in (12, 13, 14)]
    assert a.category == "shirt" and ds.has_masks("train") and ds.has_masks("test")
    # masks are the item's polygons, rasterised (COCO rasteriser): the square is 20 x 20
    m = ds.read_mask(a.train[0])
    assert m.shape == (H, W) and 380 <= m.sum() <= 441 and m[20, 20] and not m[40, 50]
    two = ds.read_mask(a.test[0])  # user image 5: rectangle 20 x 10 + triangle (area 50)
    assert 230 <= two.sum() <= 300 and two[10, 50] and two[32, 48] and not two[20, 20]
    # the image bytes are the originals; the info traces every image and garment to the source
    assert (dest / a.train[0]).read_bytes() == (src / "image" / "000001.jpg").read_bytes()
    info = json.loads((dest / "df2_info.json").read_text())
    assert info["image_to_source"][a.test[1]] == "image/000006.jpg"
    assert info["instance_to_source"]["short_sleeve_top_000001_s1"] == {
        "pair_id": 1, "style": 1, "category_name": "short sleeve top"}
    assert info["image_to_box"][a.test[0]] == [40.0, 5.0, 60.0, 40.0]
    report = check_dataset(str(dest))
    assert report.exit_code == 0, report.summary()
    assert main(["data", "check", str(dest)]) == 0


def test_df2_selection_is_an_option_and_deterministic(tmp_path):
    src = write_df2(tmp_path / "validation")
    from persrep.data.df2 import convert_df2

    r1 = convert_df2(src, tmp_path / "a", min_user=1)
    r2 = convert_df2(src, tmp_path / "b", min_user=1)
    assert r1.instances == r2.instances == 3  # + pair 1 style 2 (3 shop, 1 user)
    la, lb = (sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file())
              for d in (tmp_path / "a", tmp_path / "b"))
    assert la == lb
    assert convert_df2(src, tmp_path / "c", min_user=1, max_instances=1).instances == 1
    with pytest.raises(DatasetError, match="no garment of .* lower --min-user"):
        convert_df2(src, tmp_path / "d", min_user=9)
    assert not (tmp_path / "d").exists()


def test_df2_bad_annotation_names_file_and_field(tmp_path, capsys):
    src = write_df2(tmp_path / "validation")
    doc = json.loads((src / "annos" / "000002.json").read_text())
    doc["item1"]["bounding_box"] = [1, 2]
    (src / "annos" / "000002.json").write_text(json.dumps(doc))
    assert main(["data", "df2", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "000002.json: item1.bounding_box is [1, 2], expected [x1, y1, x2, y2]" in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
    assert main(["data", "df2", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "expected DeepFashion2's image/ and annos/ folders" in capsys.readouterr().err


def write_dogfacenet(root: Path, masks: Path | None) -> Path:
    """DogFaceNet: one folder of face crops per dog id (counts 6, 5, 5, 3, 7)."""
    for dog, n in (("0", 6), ("1", 5), ("2", 5), ("3", 3), ("10", 7)):
        for i in range(n):
            _jpg(root / dog / f"{dog}.{i}.jpg", 100 * int(dog) + i)
            if masks is not None:
                m = Image.new("L", (W, H), 0)
                ImageDraw.Draw(m).ellipse((8, 4, 56, 44), fill=255)
                (masks / dog).mkdir(parents=True, exist_ok=True)
                m.save(masks / dog / f"{dog}.{i}.png")
    return root


def test_dogs_keeps_dogs_with_enough_images_with_masks(tmp_path, capsys):
    src = write_dogfacenet(tmp_path / "after_4_bis", tmp_path / "masks")
    dest = tmp_path / "dogs"
    assert main(["data", "dogs", str(src), str(dest), "--masks", str(tmp_path / "masks"),
                 "--min-images", "5", "--max-dogs", "3"]) == 0
    out = capsys.readouterr().out
    assert "3 dogs (9 train, 9 test images, 18 masks)" in out and "3 of 4 dogs with >= 5 images kept" in out
    ds = open_dataset(str(dest))
    assert ds.names == ["0", "1", "10"]  # most images first (10: 7, 0: 6), ties by id (1 before 2)
    assert ds.instances["10"].train == [f"train/10/10.{i}.jpg" for i in range(3)]
    assert len(ds.instances["10"].test) == 4 and ds.categories == ["dog"]
    assert ds.has_masks("train") and ds.has_masks("test")
    info = json.loads((dest / "dogs_info.json").read_text())
    assert info["dogs"]["eligible"] == 4 and info["dogs"]["kept"] == 3 and info["source"] == str(src)
    assert main(["data", "check", str(dest)]) == 0, capsys.readouterr().out


def test_dogs_without_masks_and_bad_options(tmp_path, capsys):
    src = write_dogfacenet(tmp_path / "src", None)
    dest = tmp_path / "dogs"
    assert main(["data", "dogs", str(src), str(dest)]) == 0
    assert open_dataset(str(dest)).names == ["0", "1", "10", "2"]  # the 3-image dog is left out
    assert check_dataset(str(dest)).exit_code == 0
    assert main(["data", "dogs", str(src), str(tmp_path / "x"), "--min-images", "3"]) == 2
    assert "must exceed --train-count 3" in capsys.readouterr().err


def test_dogs_with_auto_masks_predicts_the_train_masks(tmp_path, capsys):
    """`persrep data dogs --auto-masks`: DogFaceNet has no masks; the train masks are predicted
    after the conversion (labelled predicted), the test images keep none."""
    src = write_dogfacenet(tmp_path / "src", None)
    dest = tmp_path / "dogs"
    rc = main(["data", "dogs", str(src), str(dest), "--max-dogs", "2", "--auto-masks"])
    out = capsys.readouterr().out
    assert "train_masks: 6 predicted with grabcut" in out, out
    # these synthetic crops are flat colours: GrabCut is unsure, and says so (exit 1: check them)
    assert rc == 1 and "6 masks have confidence < 0.5" in out, out
    ds = open_dataset(str(dest))
    assert ds.has_masks("train") and not ds.has_masks("test")
    assert json.loads((dest / ds.info_file).read_text())["predicted_masks"]["train"]["status"] == "complete"
    assert (dest / "dogs_info.json").exists()
