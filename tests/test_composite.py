"""The composited evaluation set (persrep.data.composite) on small synthetic inputs, plus COIL."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from persrep.data.composite import (CompositeSettings, plan_composite, pose_distances,
                                    render_scene, split_backgrounds, write_composite)
from persrep.data.importer import import_folder
from persrep.data.layout import SCENES, DatasetError, open_dataset

N_VIEWS = 12  # 30 degrees apart; train views 0, 4, 8 = 0, 120, 240 degrees
COLOURS = [(250, 60, 60), (60, 250, 60), (60, 60, 250), (250, 250, 60), (250, 60, 250), (60, 250, 250)]


def _object_view(k: int, v: int, size: int = 48) -> tuple[Image.Image, Image.Image]:
    """Object k seen at view v: a bright ellipse with a stripe whose position encodes the view."""
    yy, xx = np.mgrid[0:size, 0:size]
    c = size / 2
    ry, rx = size * 0.4, size * (0.2 + 0.15 * ((v % 3) / 2))
    mask = ((yy - c) / ry) ** 2 + ((xx - c) / rx) ** 2 <= 1
    img = np.zeros((size, size, 3), np.uint8)  # dark turntable background
    img[mask] = COLOURS[k % len(COLOURS)]
    stripe = mask & (np.abs(yy - (8 + 3 * v)) < 2)
    img[stripe] = (200, 200, 200)
    return Image.fromarray(img), Image.fromarray(mask.astype(np.uint8) * 255)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, Path]:
    """(imported data set with masks, backgrounds folder of 6 dark noise 'photos')."""
    root = tmp_path_factory.mktemp("composite-src")
    for k in range(6):
        for v in range(N_VIEWS):
            img, mask = _object_view(k, v)
            (root / "raw" / f"obj{k}").mkdir(parents=True, exist_ok=True)
            (root / "masks" / f"obj{k}").mkdir(parents=True, exist_ok=True)
            img.save(root / "raw" / f"obj{k}" / f"{v}.png")
            mask.save(root / "masks" / f"obj{k}" / f"{v}.png")
    rng = np.random.default_rng(0)
    bg = root / "backgrounds"
    bg.mkdir()
    for i in range(6):  # dark noise (< 40): every pasted object pixel differs from it
        Image.fromarray(rng.integers(0, 40, (80 + 8 * i, 96, 3), dtype=np.uint8)).save(bg / f"bg{i}.png")
    import_folder(root / "raw", root / "ds", masks=root / "masks", train_indices="0,4,8")
    return root / "ds", bg


SMALL = dict(size=64, test_per_instance=8, dense_per_instance=2, distractor_instances=2,
             negative_instances=1, negatives_per_instance=3, near_degrees=30, far_degrees=60)


@pytest.fixture(scope="module")
def written(source, tmp_path_factory) -> Path:
    ds, bg = source
    dest = tmp_path_factory.mktemp("composite-out") / "comp"
    write_composite(ds, bg, dest, CompositeSettings(**SMALL))
    return dest


def _info(dest: Path) -> dict:
    return json.loads((dest / "composite_info.json").read_text())


def test_layout_scenes_and_cap(source, written):
    ds = open_dataset(str(written))
    info = _info(written)
    held = set(info["composite"]["distractor_instances"]) | set(info["composite"]["negative_instances"])
    assert len(info["composite"]["distractor_instances"]) == 2
    assert len(info["composite"]["negative_instances"]) == 1
    assert set(ds.names) == {f"obj{k}" for k in range(6)} - held  # held-out objects never evaluated
    src = open_dataset(str(source[0]))
    for name in ds.names:
        inst = ds.instances[name]
        assert len(inst.train) == 3 and len(inst.test) == 8 and len(inst.test_dense) == 2
        for rel in inst.train:  # the canonical photos, bytes unchanged, with masks
            assert ds.read_bytes(rel) == src.read_bytes(rel)
            assert np.array_equal(ds.read_mask(rel), src.read_mask(rel))
        scenes = [ds.scene_of(rel) for rel in inst.test]
        assert sorted(scenes) == sorted(SCENES * 2)  # 8 capped images, 2 per scene
        assert all(ds.read_mask(rel) is not None for rel in inst.test + inst.test_dense)
        assert all(ds.read_image(rel).size == (64, 64) for rel in inst.test)
    assert ds.has_masks("test") and ds.has_masks("test_dense")
    negs = sorted((written / "negatives" / "object_negatives").glob("*.png"))
    assert len(negs) == 3


def test_pose_scenes_use_far_views_and_in_distribution_near_ones(source, written):
    src = open_dataset(str(source[0]))
    info = _info(written)
    for rel, meta in info["composite"]["images"].items():
        if not rel.startswith("test/"):
            continue
        name = rel.split("/")[1]
        d = pose_distances(src, name)[meta["view"]]
        if meta["scene"] in ("pose", "pose_and_distractors"):
            assert d >= 60
        else:
            assert 0 < d <= 30
        n_dis = len(meta["distractors"])
        assert (1 <= n_dis <= 3) if "distractors" in meta["scene"] else n_dis == 0
        assert meta["visible"] >= 0.5


def test_background_halves_are_disjoint(source, written):
    _, bg = source
    meta = _info(written)["composite"]
    train, test = set(meta["backgrounds_train"]), set(meta["backgrounds_test"])
    assert train and test and not train & test
    assert train | test == {p.name for p in bg.iterdir()}
    assert {p.name for p in (written / "backgrounds").iterdir()} == train  # what training may read
    for name in train:
        assert (written / "backgrounds" / name).read_bytes() == (bg / name).read_bytes()
    used = {m["background"] for m in meta["images"].values()}
    assert used <= test  # test and test_dense scenes only on the test half
    # the negatives are drawn on the training half
    ds = open_dataset(str(source[0]))
    plan = plan_composite(ds, bg, CompositeSettings(**SMALL))
    assert plan["negatives"] and {p.background for p in plan["negatives"].values()} <= train
    assert split_backgrounds([f"{i}.jpg" for i in range(40)], 0) == split_backgrounds(
        [f"{i}.jpg" for i in reversed(range(40))], 0)  # order of listing does not matter
    a, b = split_backgrounds([f"{i}.jpg" for i in range(40)], 0)
    assert len(a) == len(b) == 20 and not set(a) & set(b)


def test_masks_are_exact_and_exclude_occlusion(source):
    """With edge_blur=0 the pixels the target changes are exactly its mask; distractors above it
    are cut out of the mask, and at least half of the target stays visible."""
    ds_path, bg = source
    ds = open_dataset(str(ds_path))
    cs = CompositeSettings(**{**SMALL, "edge_blur": 0.0, "test_per_instance": 16})
    plan = plan_composite(ds, bg, cs)
    sources = plan["sources"]
    occluded = 0
    for rel, sp in {**plan["test"], **plan["dense"]}.items():
        image, mask, visible = render_scene(sp, sources, cs.size, 0.0)
        without, empty, _ = render_scene(sp, sources, cs.size, 0.0, with_target=False)
        assert not empty.any()
        changed = (np.asarray(image).astype(int) - np.asarray(without)).any(axis=-1)
        assert np.array_equal(changed, mask), rel
        assert visible >= 0.5 and mask.any()
        # full footprint of the target alone vs what is visible
        alone = type(sp)(sp.background, sp.crop, (sp.layers[sp.target],), 0, sp.scene)
        _, full, _ = render_scene(alone, sources, cs.size, 0.0)
        assert not (mask & ~full).any()
        for layer in sp.layers[sp.target + 1:]:
            above = type(sp)(sp.background, sp.crop, (layer,), 0, sp.scene)
            _, cover, _ = render_scene(above, sources, cs.size, 0.0)
            assert not (mask & cover).any(), f"{rel}: occluded pixels left in the mask"
            if (full & cover).any():
                occluded += 1
    assert occluded > 0, "no scene exercised occlusion: the test would be vacuous"


def test_written_masks_match_plan(source, written):
    """The files on disk are the rendered plan: mask files equal the plan's visible masks and
    nothing outside the union of the layers' footprints differs from the background crop."""
    ds_path, bg = source
    ds = open_dataset(str(ds_path))
    cs = CompositeSettings(**SMALL)
    plan = plan_composite(ds, bg, cs)
    out = open_dataset(str(written))
    for rel, sp in list(plan["test"].items())[:12]:
        _, mask, _ = render_scene(sp, plan["sources"], cs.size, cs.edge_blur)
        assert np.array_equal(out.read_mask(rel), mask)
        bare = type(sp)(sp.background, sp.crop, (), -1, sp.scene)
        background, _, _ = render_scene(bare, plan["sources"], cs.size, cs.edge_blur)
        union = np.zeros_like(mask)
        for layer in sp.layers:
            _, m, _ = render_scene(type(sp)(sp.background, sp.crop, (layer,), 0, sp.scene),
                                   plan["sources"], cs.size, cs.edge_blur)
            union |= m
        img = np.asarray(out.read_image(rel))
        assert np.array_equal(img[~union], np.asarray(background)[~union])


def test_deterministic_and_idempotent(source, written, tmp_path):
    ds, bg = source
    again = tmp_path / "again"
    write_composite(ds, bg, again, CompositeSettings(**SMALL))
    files = sorted(p.relative_to(written) for p in written.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (written / rel).read_bytes() == (again / rel).read_bytes(), rel
    res = write_composite(ds, bg, again, CompositeSettings(**SMALL))  # same inputs: reused
    assert res.reused and res.test_images == len(res.instances) * 8
    with pytest.raises(DatasetError, match="exists and is not this composite"):
        write_composite(ds, bg, again, CompositeSettings(**{**SMALL, "seed": 1}))
    other = tmp_path / "other"
    write_composite(ds, bg, other, CompositeSettings(**{**SMALL, "seed": 1}))
    assert any(not (other / f).exists() or (other / f).read_bytes() != (written / f).read_bytes()
               for f in files if f.suffix == ".png")  # another seed draws other scenes


def test_atomic_on_failure(source, tmp_path, monkeypatch):
    ds, bg = source
    import persrep.data.composite as comp

    calls = {"n": 0}
    real = comp.render_scene

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk full (simulated)")
        return real(*a, **k)

    monkeypatch.setattr(comp, "render_scene", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        write_composite(ds, bg, tmp_path / "c", CompositeSettings(**SMALL))
    assert list(tmp_path.iterdir()) == []  # no half-written data set, no temp dir left


def test_refuses_missing_masks_and_bad_settings(source, tmp_path):
    ds, bg = source
    nomask = tmp_path / "nomask"
    import_folder(Path(ds).parent / "raw", nomask, train_indices="0,4,8")
    with pytest.raises(DatasetError, match="mask"):
        write_composite(nomask, bg, tmp_path / "x", CompositeSettings(**SMALL))
    with pytest.raises(DatasetError, match="scale_pose"):
        CompositeSettings(scale_pose=(0.5, 1.4))
    with pytest.raises(DatasetError, match="distractor_instances"):
        write_composite(ds, bg, tmp_path / "y", CompositeSettings(**{**SMALL, "distractor_instances": 6}))


@pytest.mark.realdata
def test_coil_composite(shared_data, tmp_path):
    coil = tmp_path / "coil"
    import_folder(shared_data / "coil100_subset", coil, masks=shared_data / "coil100_subset_masks",
                  train_indices="0,24,48")
    cs = CompositeSettings(test_per_instance=8, dense_per_instance=1, size=160)
    res = write_composite(coil, shared_data / "backgrounds", tmp_path / "comp", cs)
    ds = open_dataset(str(res.dest))
    assert len(ds.names) == 14 and len(res.distractor_instances) == 3
    assert not set(res.backgrounds_train) & set(res.backgrounds_test)
    assert len(res.backgrounds_train) == len(res.backgrounds_test) == 20
    assert {ds.scene_of(p) for _, p in ds.test_pool()} == set(SCENES)
    info = json.loads((res.dest / "composite_info.json").read_text())["composite"]
    src = open_dataset(str(coil))
    for rel, meta in info["images"].items():
        assert meta["background"] in res.backgrounds_test
        assert meta["visible"] >= 0.5
        if rel.startswith("test/"):
            d = pose_distances(src, rel.split("/")[1])[meta["view"]]
            assert d >= 40 if "pose" in meta["scene"] else 0 < d <= 20
    for _, rel in ds.test_pool()[:20]:  # masks are plausible object sizes on a 160 px canvas
        frac = ds.read_mask(rel).mean()
        assert 0.01 < frac < 0.5
