"""Bad inputs end to end, through ``ray_jobs/run_all.py``'s ``main`` (in-process, ``--no-ray``).

Every refused case must exit 2 with exactly one line on stderr besides the progress lines,
naming the thing and the fix, and no traceback; all of them point the job at the storage root
of one finished run, which must come out byte for byte unchanged (nothing finished is lost or
overwritten). The cases the job accepts (converted image modes, unusual train counts, names
with spaces or non-ASCII letters, dense tasks without test masks) run to the end with their
warnings in the summary. The unit-level tests of the same inputs live in test_data.py,
test_config.py, test_storage.py, test_backbones.py and test_diffusion.py; docs/RELIABILITY.md
maps every case of issue #8 to its tests.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from persrep.config import load_settings
from persrep.pipeline import run_pipeline

sys.path.insert(0, str(Path(__file__).parent))
from helpers import error_lines, run_all_main  # noqa: E402
from worlds import TINY  # noqa: E402

SMALL = [*TINY, "generator.types=[real_only]", "evaluation.tasks=[classification]",
         "tracking.enabled=false"]


# -- a small data set in the reference layout, and ways to break it ------------------------------
def _png(path: Path, size=(48, 48), color=(200, 30, 30), mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(str(path))) % 2**32)
    arr = rng.integers(0, 255, (size[1], size[0], 3), np.uint8)
    arr[size[1] // 4: 3 * size[1] // 4, size[0] // 4: 3 * size[0] // 4] = color
    img = Image.fromarray(arr)
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path)


def _mask(path: Path, size=(48, 48), empty=False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.zeros(size[::-1], np.uint8)
    if not empty:
        a[size[1] // 4: 3 * size[1] // 4, size[0] // 4: 3 * size[0] // 4] = 255
    Image.fromarray(a).save(path)


def make_layout(root: Path, names=("mug_0", "mug_1", "bottle_0", "bottle_1"), n_train=3, masks=True,
                categories: dict[str, str] | None = None) -> Path:
    for k, n in enumerate(names):
        color = (40 * k % 255, 200 - 30 * k % 200, 90)
        for i in range(n_train):
            _png(root / "train" / n / f"{i}.png", color=color)
            if masks:
                _mask(root / "train_masks" / n / f"{i}.png")
        for i in range(2):
            _png(root / "test" / n / f"pose_{i}.png", color=color)
            if masks:
                _mask(root / "test_masks" / n / f"pose_{i}.png")
    cats = categories or {n: n.split("_")[0] for n in names}
    for c in sorted(set(cats.values())):  # held-out objects: the local config's external negatives
        for i in range(4):
            _png(root / "negatives" / f"{c}_negatives" / f"{i}.png", color=(10, 60 * i % 255, 200))
    (root / "set_info.json").write_text(json.dumps({"classes": list(names), "class_to_sc": cats}))
    return root


def _corrupt_jpeg(p: Path) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (48, 48), (1, 2, 3)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    data[20:200] = b"\x00" * 180
    p.write_bytes(bytes(data[: len(data) // 2]))


def _truncated_png(p: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(buf, "PNG")
    p.write_bytes(buf.getvalue()[:300])


def _replace_train(name: str, writer):
    """Replace train/mug_0/0.png by ``name`` written by ``writer``."""
    def setup(root: Path) -> None:
        (root / "train" / "mug_0" / "0.png").unlink()
        (root / "train_masks" / "mug_0" / "0.png").rename(root / "train_masks" / "mug_0" / f"{Path(name).stem}.png")
        writer(root / "train" / "mug_0" / name)
    return setup


def _rename_instance(new: str):
    def setup(root: Path) -> None:
        for split in ("train", "test", "train_masks", "test_masks"):
            (root / split / "mug_1").rename(root / split / new)
        info = json.loads((root / "set_info.json").read_text())
        info["classes"] = [new if c == "mug_1" else c for c in info["classes"]]
        info["class_to_sc"] = {(new if k == "mug_1" else k): v for k, v in info["class_to_sc"].items()}
        (root / "set_info.json").write_text(json.dumps(info))
    return setup


def _empty_instance(root: Path) -> None:
    for p in (root / "train" / "mug_1").iterdir():
        p.unlink()
    (root / "train" / "mug_1" / ".keep").write_text("")


DATA_CASES = {  # id: (setup, extra overrides, needles of the one error line)
    "corrupt_jpeg": (_replace_train("0.jpg", _corrupt_jpeg), [], ["train/mug_0/0.jpg", "not a readable image", "replace or remove"]),
    "truncated_png": (_replace_train("0.png", _truncated_png), [], ["train/mug_0/0.png", "not a readable image"]),
    "zero_byte_file": (_replace_train("0.png", lambda p: p.write_bytes(b"")), [], ["0.png", "empty file (0 bytes)"]),
    "text_named_jpg": (_replace_train("0.jpg", lambda p: p.write_text("not a JPEG")), [], ["0.jpg", "not a readable image"]),
    "one_pixel_image": (_replace_train("0.png", lambda p: _png(p, size=(1, 1))), [], ["0.png", "below 8 px"]),
    "decompression_bomb": (_replace_train("0.png", lambda p: Image.new("1", (8200, 8200)).save(p)), [],
                           ["0.png", "decompression-bomb"]),
    "mask_wrong_size": (lambda r: _mask(r / "train_masks" / "mug_0" / "1.png", size=(16, 16)), [],
                        ["train_masks/mug_0/1.png", "mask is 16x16 but its image is 48x48", "regenerate the mask"]),
    "mask_all_zero": (lambda r: _mask(r / "train_masks" / "mug_0" / "1.png", empty=True), [],
                      ["train_masks/mug_0/1.png", "mask is empty", "fix the mask"]),
    "masks_missing_for_cut_paste": (lambda r: [p.unlink() for p in (r / "train_masks").rglob("*.png")],
                                    ["generator.types=[real_only, cut_paste]"],
                                    ["need train masks", "train_masks/", "generator.types=[real_only, dreambooth]"]),
    "instance_without_train_images": (_empty_instance, [], ["train/mug_1", "no train images", "add 3 photos"]),
    "duplicate_instance_names": (_rename_instance("Mug_0"), [], ["'Mug_0'", "'mug_0'", "duplicate of", "rename one"]),
    "dotdot_in_name": (_rename_instance("mug..1"), [], ["'mug..1'", "path traversal", "rename the folder"]),
    "backslash_in_name": (_rename_instance("mug\\1"), [], ["path traversal", "rename the folder"]),
    "control_char_in_name": (_rename_instance("mug\x071"), [], ["control character", "rename the folder"]),
}


# -- the finished run every refused job is pointed at -------------------------------------------
def _snapshot(root: Path) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("finished") / "root"
    summary = run_pipeline(load_settings("local", [*SMALL, f"storage.root={root}"]), run_id="done")
    assert summary.exit_code == 0
    return root, _snapshot(root)


def _refused(capsys, argv: list[str], needles: list[str], finished) -> str:
    root, snap = finished
    rc = run_all_main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, err[-2000:]
    other = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("[")]  # [time] progress
    lines = error_lines(err)
    assert len(lines) == 1 and other == lines, f"want one error line, got:\n{err[-2000:]}"
    assert "Traceback" not in out + err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert _snapshot(root) == snap, "the finished run's files changed"
    assert not (root / "runs").joinpath("refused").exists()
    return lines[0]


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_data_is_refused_with_one_line(case, tmp_path, capsys, finished):
    setup, extra, needles = DATA_CASES[case]
    data = make_layout(tmp_path / "data")
    setup(data)
    _refused(capsys, ["--no-ray", "--storage", str(finished[0]), "--run-id", "refused", "--data", str(data),
                      *SMALL, *extra], needles, finished)


SETTINGS_CASES = {  # id: (overrides, needles)
    "unknown_key": (["personalization.lerning_rate=1"], ["personalization.lerning_rate", "unknown key"]),
    "wrong_type": (["personalization.batch_size=abc"], ["personalization.batch_size", "valid integer"]),
    "negative_cfg": (["synthesis.cfg=[-3]"], ["synthesis.cfg", "-3.0 out of range", "allowed 0 <= cfg <= 30"]),
    "absurd_cfg": (["synthesis.cfg=[500]"], ["synthesis.cfg", "500.0 out of range"]),
    "unknown_generator": (["generator.types=[diffusion_magic]"], ["generator.types", "diffusion_magic"]),
    "unknown_backbone": (["personalization.backbones=[{name: vit_base_patch14_dinov3x, weights: tiny}]"],
                         ["vit_base_patch14_dinov3x", "vit_base_patch14_dinov2"]),
    "section_used_as_value": (["synthesis.cfg.x=1"], ["synthesis.cfg", "is a value, not a section"]),
    "override_without_value": (["synthesis.cfg"], ["expected key.sub=value"]),
    "data_path_missing": (["data.path=/nonexistent/persrep-data"], ["/nonexistent/persrep-data", "not found", "'toy'"]),
    "external_negatives_without_images": (
        ["personalization.negatives=external", "personalization.external_negatives=/nonexistent/negs"],
        ["personalization.external_negatives=/nonexistent/negs", "no images", "negatives=generated"]),
}


@pytest.mark.parametrize("case", sorted(SETTINGS_CASES))
def test_bad_settings_are_refused_with_one_line(case, capsys, finished):
    overrides, needles = SETTINGS_CASES[case]
    _refused(capsys, ["--no-ray", "--storage", str(finished[0]), "--run-id", "refused", *SMALL, *overrides],
             needles, finished)


def test_unknown_config_file_is_refused(capsys, finished):
    _refused(capsys, ["--no-ray", "--config", "/nonexistent/persrep.yaml", "--storage", str(finished[0]),
                      *SMALL], ["/nonexistent/persrep.yaml", "not found"], finished)


def _offline_hub(monkeypatch, tmp_path) -> str:
    import huggingface_hub.constants as hf

    cache = str(tmp_path / "empty-hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", cache)
    return cache


def test_backbone_weights_not_available_offline(monkeypatch, tmp_path, capsys, finished):
    cache = _offline_hub(monkeypatch, tmp_path)
    _refused(capsys, ["--no-ray", "--storage", str(finished[0]), *SMALL,
                      "personalization.backbones=[{name: vit_base_patch16_224.mae, weights: timm/vit_base_patch16_224.mae}]"],
             ["timm/vit_base_patch16_224.mae", cache, "HF_HOME"], finished)


def test_diffusion_weights_not_available_offline(monkeypatch, tmp_path, capsys, finished):
    cache = _offline_hub(monkeypatch, tmp_path)
    _refused(capsys, ["--no-ray", "--storage", str(finished[0]), *SMALL, "generator.types=[real_only, dreambooth]",
                      "generator.base_model=nobody/no-such-diffusion-model"],
             ["nobody/no-such-diffusion-model", cache, "local directory"], finished)


@pytest.mark.parametrize("root, needles", [
    ("s3://AB/x", ["storage.root", "malformed S3 URI", "s3://bucket/prefix"]),
    ("gs://bucket/x", ["storage.root", "unsupported storage scheme 'gs'"]),
])
def test_malformed_storage_uri(root, needles, capsys, finished):
    _refused(capsys, ["--no-ray", "--storage", root, *SMALL], needles, finished)


def test_unwritable_output_directory(tmp_path, capsys, finished):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    line = _refused(capsys, ["--no-ray", "--storage", str(blocker / "root"), *SMALL],
                    ["cannot write to storage root", str(blocker / "root"), "writable"], finished)
    assert blocker.read_text() == "not a directory"
    assert line


def test_missing_s3_bucket(s3_server, capsys, finished):
    _refused(capsys, ["--no-ray", "--storage", "s3://no-such-bucket-persrep/p", *SMALL],
             ["no-such-bucket-persrep", "does not exist", "aws s3 mb"], finished)


# -- accepted with warnings: the run goes to the end ----------------------------------------------
def test_odd_but_usable_data_runs_to_the_end_with_its_warnings(tmp_path, capsys):
    """Converted modes (CMYK, 16-bit, palette, alpha, grayscale), 2 and 4 train images, names
    with a space and non-ASCII letters, dense tasks asked without test masks."""
    names = ("mug 0", "mug_1", "tasse_à_café", "bottle_1")
    data = make_layout(tmp_path / "data", names=names, masks=False,
                       categories={"mug 0": "mug", "mug_1": "mug", "tasse_à_café": "bottle", "bottle_1": "bottle"})
    train = data / "train"
    Image.open(train / "mug 0" / "0.png").convert("CMYK").save(train / "mug 0" / "0.jpg")
    (train / "mug 0" / "0.png").unlink()
    Image.open(train / "mug 0" / "1.png").convert("P").save(train / "mug 0" / "1.png")
    Image.fromarray((np.asarray(Image.open(train / "tasse_à_café" / "0.png").convert("L")).astype(np.uint16) * 257)
                    ).save(train / "tasse_à_café" / "0.png")
    Image.open(train / "tasse_à_café" / "1.png").convert("RGBA").save(train / "tasse_à_café" / "1.png")
    Image.open(train / "tasse_à_café" / "2.png").convert("L").save(train / "tasse_à_café" / "2.png")
    (train / "mug_1" / "2.png").unlink()                       # 2 train images
    _png(train / "bottle_1" / "3.png")                        # 4 train images
    root = tmp_path / "root"
    rc = run_all_main(["--no-ray", "--storage", str(root), "--run-id", "odd", "--data", str(data),
                       *[o for o in SMALL if not o.startswith("evaluation.tasks")],
                       "evaluation.tasks=[classification, segmentation]"])
    out, err = capsys.readouterr()
    assert rc == 0, err[-3000:]
    doc = json.loads((root / "runs" / "odd" / "summary.json").read_text())
    notes = "\n".join(doc["notes"])
    for needle in ("2 train images", "4 train images", "'mug 0'", "'tasse_à_café'",
                   "dense tasks asked but test images lack masks"):
        assert needle in notes, notes
    frame = pd.read_parquet(root / "runs" / "odd" / "results.parquet")
    per = frame[(frame["model"] == "personalised") & (frame["task"] == "classification")]
    assert sorted(per["instance"].unique()) == sorted(names)
    assert doc["failures"] == []
