"""The toy world: layout, exact masks, determinism, publishing, speed and size, instance look."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from persrep.config import ToySettings
from persrep.data.toy import (SCENES, ToyDatasetError, ToyWorld, write_toy_dataset,
                              write_toy_from_settings)
from persrep.data.toy_objects import CATEGORIES, instance_look

SMALL = dict(categories=2, instances_per_category=2, image_size=64, test_per_scene=2,
             dense_per_instance=1, negatives_per_category=4)


def _load(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    messages: list[str] = []
    dest = write_toy_dataset(tmp_path_factory.mktemp("toy") / "small", **SMALL,
                             progress=messages.append)
    assert [m for m in messages if "category" in m] == [
        "toy world: category mug (1/2)", "toy world: category bottle (2/2)"]
    return dest


@pytest.fixture(scope="module")
def default_set(tmp_path_factory) -> tuple[Path, float]:
    start = time.perf_counter()
    dest = write_toy_dataset(tmp_path_factory.mktemp("toy") / "default")
    return dest, time.perf_counter() - start


def test_layout_and_info_are_consistent(small):
    info = json.loads((small / "toy_info.json").read_text())
    names = ["bottle_0", "bottle_1", "mug_0", "mug_1"]
    assert info["classes"] == names
    assert info["class_to_idx"] == {n: i for i, n in enumerate(names)}
    assert info["class_to_sc"] == {"bottle_0": "bottle", "bottle_1": "bottle", "mug_0": "mug",
                                   "mug_1": "mug"}
    assert sorted(info["class_to_split"].values()) == ["test", "test", "test", "val"]  # 30 % of 4
    assert info["generator"]["params"] == ToySettings(**SMALL).model_dump()
    assert info["generator"]["version"]

    expected = {"toy_info.json"} | {f"backgrounds/{i}.png" for i in range(12)}
    for name in names:
        for split in ("train", "train_masks"):
            expected |= {f"{split}/{name}/{i}.png" for i in range(3)}
        for split in ("test", "test_masks"):
            expected |= {f"{split}/{name}/{s}_{i}.png" for s in SCENES for i in range(2)}
        expected |= {f"test_dense/{name}/0.png", f"test_dense_masks/{name}/0.png"}
    for category in ("mug", "bottle"):
        for split in ("negatives", "negatives_masks"):
            expected |= {f"{split}/{category}_negatives/{j}.png" for j in range(4)}
    assert set(_files(small)) == expected

    test_images = {p for p in expected if p.startswith("test/")}
    assert set(info["image_to_scene"]) == test_images
    for path, scene in info["image_to_scene"].items():
        assert Path(path).stem.rsplit("_", 1)[0] == scene

    for path, file in _files(small).items():
        if path.endswith(".png"):
            image = Image.open(file)
            assert image.size == (64, 64), path
            if "_masks/" in path:
                assert image.mode == "L", path
                values = set(np.unique(np.asarray(image)))
                assert values == {0, 255}, f"{path}: mask must be binary and nonempty"
            else:
                assert image.mode == "RGB", path


def test_every_mask_is_exactly_the_pixels_its_target_changed(small):
    world = ToyWorld(seed=0, **SMALL)
    occluded = 0
    for image in world.images():
        scene = world.scene(image)
        rendered, mask = scene.render()
        without_target, no_mask = scene.render(with_target=False)
        assert np.array_equal(_load(small / image.path), rendered), image.path
        assert np.array_equal(_load(small / image.mask_path) > 0, mask), image.mask_path
        changed = (rendered != without_target).any(-1)
        assert np.array_equal(changed, mask), f"{image.path}: mask != pixels the target changed"
        assert not no_mask.any()
        unoccluded = scene.layers[scene.target][1]
        assert mask.sum() >= 0.5 * unoccluded.sum(), f"{image.path}: target hidden by > 50 %"
        occluded += int(mask.sum() < unoccluded.sum())
        n_objects = len(scene.layers)
        if image.scene in ("in_distribution", "pose", "train"):
            assert n_objects == 1, image.path
        elif image.scene == "dense":
            assert 1 <= n_objects - 1 <= 2, image.path
        else:
            assert 1 <= n_objects - 1 <= 3, image.path
    assert occluded > 0, "no scene occludes its target: occlusion handling is untested"


def test_target_rendered_over_an_identical_pixel_still_changes_it():
    from persrep.data.toy import Scene

    background = np.full((4, 4, 3), 200, np.uint8)
    rgb = np.full((4, 4, 3), 200, np.uint8)  # same colour as the background
    mask = np.zeros((4, 4), bool)
    mask[1:3, 1:3] = True
    scene = Scene(background, [(rgb, mask)], 0)
    image, target_mask = scene.render()
    assert np.array_equal((image != background).any(-1), target_mask)
    assert np.array_equal(target_mask, mask)


def test_same_arguments_give_identical_bytes(small, tmp_path):
    again = write_toy_dataset(tmp_path / "again", **SMALL)
    first, second = _files(small), _files(again)
    assert first.keys() == second.keys()
    for path in first:
        assert first[path].read_bytes() == second[path].read_bytes(), path


def test_other_seed_gives_other_images(small, tmp_path):
    other = write_toy_dataset(tmp_path / "other", **{**SMALL, "seed": 1})
    a, b = _load(small / "train/mug_0/0.png"), _load(other / "train/mug_0/0.png")
    assert not np.array_equal(a, b)


def test_rerun_returns_without_rewriting(small):
    before = {p: f.stat().st_mtime_ns for p, f in _files(small).items()}
    messages: list[str] = []
    assert write_toy_dataset(small, **SMALL, progress=messages.append) == small
    assert write_toy_from_settings(small, ToySettings(**SMALL)) == small
    assert {p: f.stat().st_mtime_ns for p, f in _files(small).items()} == before
    assert messages == []


def test_other_parameters_are_refused_naming_the_destination(small):
    with pytest.raises(ToyDatasetError, match="other parameters") as caught:
        write_toy_dataset(small, **{**SMALL, "image_size": 96})
    assert str(small) in str(caught.value) and "delete" in str(caught.value)


def test_foreign_directory_is_refused_and_empty_one_is_filled(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ToyDatasetError, match="no toy_info.json") as caught:
        write_toy_dataset(foreign, categories=1, instances_per_category=1, image_size=32,
                          train_per_instance=1, test_per_scene=1, dense_per_instance=0,
                          negatives_per_category=0)
    assert str(foreign) in str(caught.value)
    assert (foreign / "notes.txt").read_text() == "mine"

    empty = tmp_path / "empty"
    empty.mkdir()
    write_toy_dataset(empty, categories=1, instances_per_category=1, image_size=32,
                      train_per_instance=1, test_per_scene=1, dense_per_instance=0,
                      negatives_per_category=0)
    assert (empty / "toy_info.json").is_file()


def test_interrupted_run_leaves_nothing_that_looks_complete(tmp_path):
    def interrupt_on_second_category(message: str) -> None:
        if "(2/2)" in message:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_toy_dataset(tmp_path / "toy", **SMALL, progress=interrupt_on_second_category)
    assert list(tmp_path.iterdir()) == []  # neither the destination nor the build directory


def test_invalid_settings_name_the_field(tmp_path):
    with pytest.raises(ToyDatasetError, match="categories"):
        write_toy_dataset(tmp_path / "toy", categories=9)
    assert not (tmp_path / "toy").exists()


def test_negatives_and_distractors_are_never_evaluated_instances():
    world = ToyWorld(seed=0, **SMALL)
    evaluated = {instance_look(0, c, k) for c in range(2) for k in range(2)}
    negatives = [im for im in world.images() if im.stream == "negatives"]
    assert len(negatives) == 8
    assert all(instance_look(0, im.category_index, im.key) not in evaluated for im in negatives)
    negative_looks = {instance_look(0, im.category_index, im.key) for im in negatives}
    assert len(negative_looks) == 8, "each negative image shows a fresh instance"


def test_default_set_is_fast_and_small(default_set):
    dest, seconds = default_set
    size = sum(f.stat().st_size for f in _files(dest).values())
    print(f"toy default set: {seconds:.1f} s, {size / 1e6:.1f} MB, {len(_files(dest))} files")
    assert seconds < 30, f"default toy set took {seconds:.1f} s (requirement: < 30 s)"
    assert size < 20e6, f"default toy set is {size / 1e6:.1f} MB (requirement: < 20 MB)"
    info = json.loads((dest / "toy_info.json").read_text())
    assert len(info["classes"]) == 20
    assert sum(s == "val" for s in info["class_to_split"].values()) == 6
    assert len(info["image_to_scene"]) == 20 * 4 * 3


def test_train_objects_are_centred_and_fill_half_the_frame(default_set):
    dest, _ = default_set
    for mask_file in sorted((dest / "train_masks").rglob("*.png")):
        ys, xs = np.nonzero(_load(mask_file))
        extent = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) / 128
        assert 0.45 <= extent <= 0.68, f"{mask_file}: object spans {extent:.2f} of the frame"
        centre = np.array([(xs.max() + xs.min()) / 2, (ys.max() + ys.min()) / 2]) / 128
        assert np.abs(centre - 0.5).max() < 0.12, f"{mask_file}: object not centred"


def _object_histogram(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    bins = image[mask].astype(int) // 64  # 4 levels per channel
    counts = np.bincount(bins[:, 0] * 16 + bins[:, 1] * 4 + bins[:, 2], minlength=64)
    return counts / counts.sum()


def test_instances_share_the_category_look_but_differ_in_detail(default_set):
    dest, _ = default_set
    info = json.loads((dest / "toy_info.json").read_text())
    names, category = info["classes"], info["class_to_sc"]
    images = {n: _load(dest / f"train/{n}/0.png").astype(int) for n in names}
    masks = {n: _load(dest / f"train_masks/{n}/0.png") > 0 for n in names}
    hists = {n: _object_histogram(images[n], masks[n]) for n in names}
    for name in names:  # each instance's colours are closer to its category than to the others
        same = [np.abs(hists[name] - hists[o]).sum() for o in names
                if o != name and category[o] == category[name]]
        other = [np.abs(hists[name] - hists[o]).sum() for o in names
                 if category[o] != category[name]]
        assert np.mean(same) < np.mean(other), name
    for a, b in itertools.combinations(names, 2):
        if category[a] == category[b]:  # but their surfaces visibly differ where both are drawn
            both = masks[a] & masks[b]
            difference = np.abs(images[a] - images[b])[both].mean()
            assert difference > 10, f"{a} and {b} differ by only {difference:.1f} grey levels"


def test_silhouettes_differ_between_categories():
    from persrep.data.toy_objects import render_sprite

    silhouettes = {name: np.asarray(render_sprite(instance_look(0, c, 0), 64))[..., 3] >= 128
                   for c, name in enumerate(CATEGORIES)}
    for a, b in itertools.combinations(CATEGORIES, 2):
        union = (silhouettes[a] | silhouettes[b]).sum()
        overlap = (silhouettes[a] & silhouettes[b]).sum() / union
        # blob-like pairs overlap a lot (ball/box: 0.86) yet differ at the outline
        assert overlap < 0.9, f"{a} and {b} silhouettes overlap {overlap:.2f} (IoU)"
    for k in range(1, 5):  # while instances of one category share it exactly
        other = np.asarray(render_sprite(instance_look(0, 0, k), 64))[..., 3] >= 128
        assert np.array_equal(other, silhouettes["mug"])


def test_generation_is_the_same_in_a_fresh_process(small, tmp_path):
    """Guards against hidden state (caches, hash order) leaking into the bytes."""
    code = ("import sys; from persrep.data.toy import write_toy_dataset; "
            f"write_toy_dataset(sys.argv[1], **{SMALL!r})")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "fresh")], check=True,
                   env={**os.environ, "PYTHONHASHSEED": "123"})
    for path, file in _files(small).items():
        assert (tmp_path / "fresh" / path).read_bytes() == file.read_bytes(), path
