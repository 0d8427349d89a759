"""Layout reading, validation (`data check`), import and PODS, on small files made here."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from persrep.data.check import check_dataset
from persrep.data.importer import import_folder, read_category_map
from persrep.data.layout import DatasetError, natural_key, open_dataset, select_instances
from persrep.data.pods import materialize_pods


def _img(path: Path, size=(32, 32), color=(200, 30, 30), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode == "RGB" else 128).save(path)


def _mask(path: Path, size=(32, 32), empty=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.zeros(size[::-1], np.uint8)
    if not empty:
        a[8:24, 8:24] = 255
    Image.fromarray(a).save(path)


def make_dataset(root: Path, names=("mug_0", "mug_1"), n_train=3, n_test=2, masks=True) -> Path:
    for n in names:
        for i in range(n_train):
            _img(root / "train" / n / f"{i}.png")
            if masks:
                _mask(root / "train_masks" / n / f"{i}.png")
        for i in range(n_test):
            _img(root / "test" / n / f"pose_{i}.png")
            if masks:
                _mask(root / "test_masks" / n / f"pose_{i}.png")
    old = json.loads((root / "x_info.json").read_text()) if (root / "x_info.json").is_file() else {}
    info = {"classes": [*old.get("classes", []), *names],  # a second call adds its instances
            "class_to_sc": {**old.get("class_to_sc", {}), **{n: n.split("_")[0] for n in names}},
            "image_to_scene": {**old.get("image_to_scene", {}),
                               **{f"test/{n}/pose_{i}.png": "pose" for n in names for i in range(n_test)}}}
    (root / "x_info.json").write_text(json.dumps(info))
    return root


def test_open_dataset_reads_layout(tmp_path):
    ds = open_dataset(str(make_dataset(tmp_path / "d")))
    assert ds.names == ["mug_0", "mug_1"] and ds.categories == ["mug"]
    assert ds.instances["mug_0"].train == [f"train/mug_0/{i}.png" for i in range(3)]
    assert ds.has_masks("train") and ds.has_masks("test")
    assert ds.scene_of("test/mug_1/pose_0.png") == "pose"
    assert ds.read_image("train/mug_0/0.png").mode == "RGB"
    assert ds.read_mask("train/mug_0/0.png").sum() == 16 * 16
    assert len(ds.test_pool()) == 4
    assert check_dataset(ds).exit_code == 0


def test_natural_order():
    assert sorted(["10.jpg", "2.jpg", "1.jpg"], key=natural_key) == ["1.jpg", "2.jpg", "10.jpg"]


def test_listing_key_changes_with_content(tmp_path):
    root = make_dataset(tmp_path / "d")
    k1 = open_dataset(str(root)).listing_key
    assert open_dataset(str(root)).listing_key == k1
    _img(root / "test" / "mug_0" / "pose_9.png", size=(40, 40))
    assert open_dataset(str(root)).listing_key != k1


def test_missing_layout_is_clear(tmp_path):
    with pytest.raises(DatasetError, match="empty or missing"):
        open_dataset(str(tmp_path / "nothing"))
    (tmp_path / "flat").mkdir()
    _img(tmp_path / "flat" / "a" / "0.png")
    with pytest.raises(DatasetError, match="no train/<instance>/<image>.*data import"):
        open_dataset(str(tmp_path / "flat"))


def test_select_instances(tmp_path):
    ds = open_dataset(str(make_dataset(tmp_path / "d", names=("a_0", "a_1", "b_0"))))
    assert select_instances(ds, max_instances=2) == ["a_0", "b_0"]  # one per category first
    assert select_instances(ds, max_instances=3) == ["a_0", "a_1", "b_0"]
    assert select_instances(ds, ["b_0"]) == ["b_0"]
    with pytest.raises(DatasetError, match="unknown instance"):
        select_instances(ds, ["zzz"])
    with pytest.raises(DatasetError, match="no class_to_split"):
        select_instances(ds, split="val")


# ---- bad inputs: one finding each, naming the file, the problem and the fix -------------------
def _corrupt_jpeg(p: Path):
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    data[20:200] = b"\x00" * 180
    p.write_bytes(bytes(data[: len(data) // 2]))


def _truncated_png(p: Path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(buf, "PNG")
    p.write_bytes(buf.getvalue()[:300])


def _bomb(p: Path):
    Image.new("1", (8200, 8200)).save(p)  # 67 MP, a few KB on disk


BAD_FILES = {
    "corrupt_jpeg": ("0.jpg", _corrupt_jpeg, "error", "not a readable image"),
    "truncated_png": ("0.png", _truncated_png, "error", "not a readable image"),
    "zero_bytes": ("0.png", lambda p: p.write_bytes(b""), "error", "empty file"),
    "text_as_jpg": ("0.jpg", lambda p: p.write_text("hello, I am not a JPEG"), "error", "not a readable image"),
    "one_pixel": ("0.png", lambda p: _img(p, size=(1, 1)), "error", "below 8 px"),
    "bomb": ("0.png", _bomb, "error", "decompression-bomb"),
    "cmyk": ("0.jpg", lambda p: Image.new("CMYK", (32, 32), (0, 50, 50, 0)).save(p), "note", "mode CMYK"),
    "sixteen_bit": ("0.png", lambda p: Image.fromarray(np.full((32, 32), 40000, np.uint16)).save(p), "note", "mode I"),
    "palette": ("0.png", lambda p: Image.new("P", (32, 32), 3).save(p), "note", "mode P"),
    "alpha": ("0.png", lambda p: Image.new("RGBA", (32, 32), (1, 2, 3, 100)).save(p), "note", "mode RGBA"),
    "grayscale": ("0.png", lambda p: Image.new("L", (32, 32), 9).save(p), "note", "mode L"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_image_files_are_reported(tmp_path, case):
    fname, writer, severity, needle = BAD_FILES[case]
    root = make_dataset(tmp_path / "d", masks=False)
    target = root / "train" / "mug_0" / fname
    (root / "train" / "mug_0" / "0.png").unlink()
    writer(target)
    report = check_dataset(str(root))
    hits = [f for f in report.findings if f.severity == severity and needle in f.problem]
    assert hits, report.summary()
    assert fname in hits[0].where and hits[0].fix
    assert report.exit_code == (2 if severity == "error" else 0)
    if severity == "note":  # converted modes are readable as RGB
        assert open_dataset(str(root)).read_image(f"train/mug_0/{fname}").mode == "RGB"
    else:
        with pytest.raises(DatasetError, match=fname):
            open_dataset(str(root)).read_image(f"train/mug_0/{fname}")


def test_mask_problems(tmp_path):
    root = make_dataset(tmp_path / "d")
    _mask(root / "train_masks" / "mug_0" / "1.png", size=(16, 16))          # wrong size
    _mask(root / "train_masks" / "mug_1" / "2.png", empty=True)             # all zero (train)
    (root / "test_masks" / "mug_1" / "pose_1.png").unlink()                 # missing
    report = check_dataset(str(root))
    lines = report.summary()
    assert "mask is 16x16 but its image is 32x32" in lines
    assert "mask is empty" in lines and "train_masks/mug_1/2.png" in lines
    assert "no mask although other images" in lines and "test/mug_1/pose_1.png" in lines
    assert report.exit_code == 2


def test_masks_missing_when_dense_tasks_asked(tmp_path):
    root = make_dataset(tmp_path / "d", masks=False)
    report = check_dataset(str(root), dense_tasks=True)
    assert any("dense tasks asked but test images lack masks" in f.problem for f in report.findings)
    assert report.exit_code == 1


@pytest.mark.parametrize("n_train, code, needle", [(2, 1, "2 train images"), (5, 1, "5 train images"),
                                                    (0, 2, "no train images")])
def test_train_image_count(tmp_path, n_train, code, needle):
    root = make_dataset(tmp_path / "d", names=("a",), n_train=3, masks=False)
    make_dataset(root, names=("b",), n_train=n_train, masks=False)
    report = check_dataset(str(root))
    assert needle in report.summary() and report.exit_code == code


def test_empty_instance_folder(tmp_path):
    root = make_dataset(tmp_path / "d", masks=False)
    make_dataset(root, names=("lonely",), n_train=0, n_test=1, masks=False)
    assert "instance has no train images" in check_dataset(str(root)).summary()


@pytest.mark.parametrize("name, severity", [("Mug_0", "error"), ("my mug", "warning"),
                                            ("tasse_à_café", "warning")])
def test_instance_names(tmp_path, name, severity):
    root = make_dataset(tmp_path / "d", names=("mug_0", name), masks=False)
    report = check_dataset(str(root))
    hits = [f for f in report.findings if name in f.where + f.problem and f.severity == severity]
    assert hits, report.summary()


def test_unsafe_names_refused_by_import(tmp_path):
    src = tmp_path / "src"
    _img(src / "ok" / "0.png")
    _img(src / "a..b" / "0.png")
    with pytest.raises(DatasetError, match="path traversal"):
        import_folder(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---- import ----------------------------------------------------------------------------------
def _src(tmp_path, n_inst=2, n_img=5):
    src = tmp_path / "src"
    for k in range(n_inst):
        for i in range(n_img):
            _img(src / f"obj{k}" / f"{i}.png", color=(10 * i, 20 * k, 5))
            _mask(tmp_path / "masks" / f"obj{k}" / f"{i}.png")
    return src


def test_import_first_n_and_indices(tmp_path):
    src = _src(tmp_path)
    res = import_folder(src, tmp_path / "a", masks=tmp_path / "masks", category="thing")
    assert (res.instances, res.train_images, res.test_images, res.masks) == (2, 6, 4, 10)
    ds = open_dataset(str(tmp_path / "a"))
    assert [Path(p).name for p in ds.instances["obj0"].train] == ["0.png", "1.png", "2.png"]
    assert ds.categories == ["thing"] and ds.has_masks("test")
    assert check_dataset(ds).exit_code == 0
    import_folder(src, tmp_path / "b", train_indices="0,2,4")
    ds = open_dataset(str(tmp_path / "b"))
    assert [Path(p).name for p in ds.instances["obj1"].train] == ["0.png", "2.png", "4.png"]
    assert ds.categories == ["object"]
    with pytest.raises(DatasetError, match="out of range"):
        import_folder(src, tmp_path / "c", train_indices="0,9")
    assert not (tmp_path / "c").exists()
    with pytest.raises(DatasetError, match="already exists"):
        import_folder(src, tmp_path / "a")


def test_import_stops_on_bad_file_unless_skip(tmp_path):
    src = _src(tmp_path)
    (src / "obj0" / "9.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="9.png.*--skip-bad"):
        import_folder(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
    res = import_folder(src, tmp_path / "out", skip_bad=True)
    assert len(res.skipped) == 1 and "9.png" in res.skipped[0]


def test_category_files(tmp_path):
    (tmp_path / "c.csv").write_text("obj0,mug\nobj1,bottle\n")
    (tmp_path / "c.json").write_text('{"obj0": "mug"}')
    (tmp_path / "prompts_and_classes.txt").write_text(
        "Classes\n\nsubject_name,class\nbackpack,backpack\nbear_plushie,stuffed animal\n\n"
        "Prompts\n\nprompt_list = [\n'a {0} {1} in the jungle'.format(unique_token, class_token),\n]\n")
    assert read_category_map(tmp_path / "c.csv") == {"obj0": "mug", "obj1": "bottle"}
    assert read_category_map(tmp_path / "c.json") == {"obj0": "mug"}
    assert read_category_map(tmp_path / "prompts_and_classes.txt") == {
        "backpack": "backpack", "bear_plushie": "stuffed animal"}


# ---- PODS parquet ----------------------------------------------------------------------------
def _png_bytes(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def test_pods_parquet_materializes(tmp_path):
    rng = np.random.default_rng(0)
    img = lambda: {"bytes": _png_bytes(rng.integers(0, 255, (24, 24, 3), np.uint8)), "path": None}
    mask = {"bytes": _png_bytes((np.arange(576).reshape(24, 24) % 2 * 255).astype(np.uint8)), "path": None}
    labels = ["mugs_red", "bottles_ai2"]
    rows = {"train": [(lab, "train") for lab in labels for _ in range(3)],
            "test": [(lab, sc) for lab in labels for sc in ("pose", "distractors")],
            "test_dense": [(labels[0], "pose")]}
    (tmp_path / "pods" / "data").mkdir(parents=True)
    for split, rr in rows.items():
        table = pa.table({"image": [img() for _ in rr], "mask": [mask for _ in rr],
                          "label": [r[0] for r in rr], "scene_type": [r[1] for r in rr]})
        pq.write_table(table, tmp_path / "pods" / "data" / f"{split}-00000-of-00001.parquet")
    dest = materialize_pods(tmp_path / "pods", tmp_path / "layout")
    ds = open_dataset(str(dest))
    assert ds.names == ["bottles_ai2", "mugs_red"] and ds.categories == ["bottles", "mugs"]
    assert len(ds.instances["mugs_red"].train) == 3 and len(ds.instances["mugs_red"].test_dense) == 1
    assert sorted(ds.scenes.values()) == ["distractors", "distractors", "pose", "pose"]
    assert ds.has_masks("test") and ds.read_mask(ds.instances["mugs_red"].test[0]).sum() == 288
    assert check_dataset(ds).exit_code == 0
    assert materialize_pods(tmp_path / "pods", tmp_path / "layout") == dest  # idempotent


def test_pods_missing_columns(tmp_path):
    (tmp_path / "p").mkdir()
    pq.write_table(pa.table({"image": [b"x"]}), tmp_path / "p" / "train-0.parquet")
    with pytest.raises(DatasetError, match="missing column"):
        materialize_pods(tmp_path / "p", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---- S3 --------------------------------------------------------------------------------------
def test_dataset_from_s3(tmp_path, s3_bucket, s3_server):
    import boto3

    root = make_dataset(tmp_path / "d")
    s3 = boto3.client("s3", endpoint_url=s3_server)
    for p in root.rglob("*"):
        if p.is_file():
            s3.upload_file(str(p), s3_bucket, f"ds/{p.relative_to(root)}")
    ds = open_dataset(f"s3://{s3_bucket}/ds")
    assert ds.names == ["mug_0", "mug_1"] and ds.has_masks("test")
    assert ds.read_image("test/mug_0/pose_0.png").size == (32, 32)
    assert check_dataset(ds).exit_code == 0


# ---- CLI -------------------------------------------------------------------------------------
def test_cli_check_exit_codes(tmp_path):
    root = make_dataset(tmp_path / "d")
    run = lambda *a: subprocess.run([sys.executable, "-m", "persrep.cli", *a], capture_output=True, text=True)
    assert run("data", "check", str(root)).returncode == 0
    (root / "train" / "mug_0" / "0.png").write_bytes(b"")
    r = run("data", "check", str(root))
    assert r.returncode == 2 and "empty file" in r.stdout
    r = run("config", "show", "personalization.nope=1")
    assert r.returncode == 2 and "personalization.nope" in r.stderr and "Traceback" not in r.stderr


# ---- real data -------------------------------------------------------------------------------
@pytest.mark.realdata
def test_import_real_dreambooth(shared_data, tmp_path):
    res = import_folder(shared_data / "dreambooth", tmp_path / "db")
    assert res.instances == 29 and res.train_images == 87
    ds = open_dataset(str(tmp_path / "db"))
    assert ds.instances["teapot"].category == "teapot" and len(ds.instances_of("dog")) == 7
    assert ds.instances["bear_plushie"].category == "stuffed animal"
    report = check_dataset(ds)
    assert report.exit_code == 0, report.summary()


@pytest.mark.realdata
def test_import_real_coil_with_masks(shared_data, tmp_path):
    res = import_folder(shared_data / "coil100_subset", tmp_path / "coil",
                        masks=shared_data / "coil100_subset_masks", train_indices="0,24,48")
    assert (res.instances, res.train_images, res.test_images, res.masks) == (17, 51, 1173, 1224)
    ds = open_dataset(str(tmp_path / "coil"))
    assert ds.has_masks("train") and ds.has_masks("test")
    report = check_dataset(ds)
    assert not report.of("error"), report.summary()
