"""Segmenters (GrabCut on real photos, tiny SAM / PerSAM from config), `persrep data masks`, mask checks."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from persrep.cli import main as cli
from persrep.config import SegmentationSettings
from persrep.data.check import check_dataset
from persrep.data.layout import open_dataset
from persrep.segmentation import (Reference, SegmenterUnavailableError, get_segmenter,
                                  require_available, segmenter_class, segmenter_names)
from persrep.segmentation.dataset import mask_iou, write_masks

TINY = SegmentationSettings(model="tiny")


def disc_photo(size=96, hole=True, blob=True, seed=0):
    """A textured red disc (with a hole) on a noisy blue-grey background, plus a stray blob."""
    rng = np.random.default_rng(seed)
    bg = np.clip(rng.normal([70, 90, 140], 12, (size, size, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(bg)
    d = ImageDraw.Draw(img)
    c, r = size // 2, size // 3
    d.ellipse([c - r, c - r, c + r, c + r], fill=(220, 40, 30))
    if hole:
        d.ellipse([c - 3, c - 3, c + 3, c + 3], fill=(70, 90, 140))
    if blob:
        d.rectangle([2, 2, 5, 5], fill=(220, 40, 30))
    yy, xx = np.mgrid[:size, :size]
    truth = (yy - c) ** 2 + (xx - c) ** 2 <= r ** 2
    return img, truth


# -- the slot ---------------------------------------------------------------------------------
def test_registry_names_needs_and_preflight(tmp_path):
    assert segmenter_names() == ["grabcut", "persam", "sam"]
    assert not segmenter_class("grabcut").needs.weights
    assert segmenter_class("sam").needs.weights and not segmenter_class("sam").needs.reference
    assert segmenter_class("persam").needs.reference
    with pytest.raises(ValueError, match="unknown segmenter 'mask-rcnn'.*segmentation.segmenter"):
        segmenter_class("mask-rcnn")
    with pytest.raises(SegmenterUnavailableError, match="segmentation.model is not set.*grabcut") as info:
        require_available("sam", SegmentationSettings())
    assert "\n" not in str(info.value)
    with pytest.raises(SegmenterUnavailableError, match="not in the Hugging Face cache"):
        require_available("persam", SegmentationSettings(model="nobody/no-such-sam"))
    with pytest.raises(SegmenterUnavailableError, match="no config.json"):
        require_available("sam", SegmentationSettings(model=str(tmp_path)))
    assert "tiny" in require_available("persam", TINY)
    assert "no weights" in require_available("grabcut", SegmentationSettings())


# -- GrabCut ------------------------------------------------------------------------------------
def test_grabcut_post_processing_and_confidence_on_a_drawn_object():
    img, truth = disc_photo()
    seg = get_segmenter("grabcut", SegmentationSettings(init="box", margin=0.1))
    out = seg.segment([img])[0]
    assert out.mask.shape == truth.shape and out.mask.dtype == bool
    assert mask_iou(out.mask, truth) > 0.9  # the hole is filled, the stray blob dropped
    assert out.mask[48, 48] and not out.mask[3, 3]
    from scipy import ndimage
    assert ndimage.label(out.mask)[1] == 1
    # uniform noise has no object: a low confidence, far below the drawn object's
    noise = Image.fromarray(np.random.default_rng(1).integers(0, 256, (96, 96, 3), dtype=np.uint8))
    low = seg.segment([noise])[0]
    assert 0.0 <= low.confidence < 0.5 < out.confidence <= 1.0


@pytest.mark.realdata
def test_grabcut_on_real_coil_photos_matches_the_provided_masks(shared_data):
    root, mroot = shared_data / "coil100_subset", shared_data / "coil100_subset_masks"
    objs = sorted(p.name for p in mroot.iterdir() if p.is_dir())[:4]
    images = [Image.open(root / o / "0.png").convert("RGB") for o in objs]
    truth = [np.asarray(Image.open(mroot / o / "0.png").convert("L")) > 0 for o in objs]
    for init in ("box", "prior"):
        outs = get_segmenter("grabcut", SegmentationSettings(init=init)).segment(images)
        ious = [mask_iou(o.mask, t) for o, t in zip(outs, truth)]
        assert all(o.mask.shape == t.shape for o, t in zip(outs, truth))
        assert all(0 <= o.confidence <= 1 for o in outs)
        if init == "box":  # measured 0.92 mean over 17 objects x 6 views (bench/masks.json)
            assert np.mean(ious) > 0.8, ious
        else:
            assert np.mean(ious) > 0.3, ious  # the prior start finds the object, less well on COIL
    # with a reference, the prior is the object's own features: it must mark the object
    from persrep.segmentation.grabcut import feature_priors
    prior = feature_priors(images[1:2], Reference(images[:1], truth[:1]))[0]
    small = np.asarray(Image.fromarray(truth[1].astype(np.uint8)).resize(prior.shape[::-1])) > 0
    assert prior[small].mean() > prior[~small].mean()


@pytest.mark.realdata
def test_grabcut_mask_does_not_depend_on_what_the_worker_segmented_before(shared_data):
    """GrabCut's k-means start draws from OpenCV's RNG; a Ray worker's RNG state depends on the
    units it ran before. Measured without the reseed: up to 2,282 of 121,104 pixels of a produce
    photo changed with the RNG state."""
    import cv2

    photos = sorted((shared_data / "grocery_produce" / "train").glob("*/*"))[:12:3]
    if not photos:
        pytest.skip(f"no photos in {shared_data / 'grocery_produce' / 'train'}")
    seg = get_segmenter("grabcut", SegmentationSettings(init="box"))
    for path in photos:
        img = Image.open(path).convert("RGB")
        masks = []
        for state in (1, 7920, 15839):
            cv2.setRNGSeed(state)  # another history of the worker's RNG
            masks.append(seg.segment([img])[0].mask)
        assert all(np.array_equal(m, masks[0]) for m in masks[1:]), path.name


# -- SAM / PerSAM (tiny, random weights) ------------------------------------------------------
def test_tiny_sam_from_config_and_from_a_saved_directory(tmp_path):
    from persrep.segmentation.sam import load_sam

    img, _ = disc_photo(size=80)
    out = get_segmenter("sam", TINY).segment([img, img.resize((120, 60))])
    assert [o.mask.shape for o in out] == [(80, 80), (60, 120)]
    assert all(o.mask.dtype == bool and 0 <= o.confidence <= 1 for o in out)
    net, proc = load_sam("tiny")
    net.save_pretrained(tmp_path / "sam")
    proc.save_pretrained(tmp_path / "sam")
    again = get_segmenter("sam", SegmentationSettings(model=str(tmp_path / "sam"))).segment([img])
    assert np.array_equal(again[0].mask, out[0].mask)  # real checkpoints load through the same code


def test_persam_location_prior_is_the_cosine_similarity_to_the_masked_reference():
    from persrep.segmentation.sam import load_sam

    seg = get_segmenter("persam", TINY)
    ref_img, ref_mask = disc_photo(size=128, blob=False)
    target, _ = disc_photo(size=128, seed=3)
    ref = Reference([ref_img], [ref_mask])
    feat = seg.target_feature(ref)
    # oracle in float64: the reference embedding averaged under the mask (resized to the grid)
    net, proc = load_sam("tiny")
    inputs = proc(images=ref_img, return_tensors="pt")
    with torch.no_grad():
        emb = net.get_image_embeddings(inputs["pixel_values"])[0].double()  # [C, 8, 8]
    w = F.adaptive_avg_pool2d(torch.from_numpy(ref_mask.astype(np.float64))[None, None], emb.shape[-2:])[0, 0]
    oracle = (emb * w).sum((1, 2)) / w.sum()
    oracle = oracle / oracle.norm()
    assert torch.allclose(feat.double(), oracle, atol=1e-5)
    tin = proc(images=target, return_tensors="pt")
    with torch.no_grad():
        temb = net.get_image_embeddings(tin["pixel_values"])
    sim = seg.location_prior(temb, feat).double()
    cells = temb[0].double() / temb[0].double().norm(dim=0, keepdim=True)
    assert torch.allclose(sim, torch.einsum("chw,c->hw", cells, oracle), atol=1e-5)
    out = seg.segment([target], ref)[0]
    assert out.mask.shape == (128, 128) and 0 <= out.confidence <= 1
    with pytest.raises(ValueError, match="persam needs a reference"):
        seg.segment([target])


# -- persrep data masks, data check -------------------------------------------------------------
def _maskless(tmp_path, n=2):
    """A tiny data set in the reference layout without masks: drawn objects (no download)."""
    root = tmp_path / "plain"
    for i in range(n):
        for split, seeds in (("train", range(3)), ("test", range(3, 5))):
            (root / split / f"obj{i}").mkdir(parents=True, exist_ok=True)
            for s in seeds:
                disc_photo(size=64, seed=10 * i + s)[0].save(root / split / f"obj{i}" / f"{s}.png")
    return root


def test_data_masks_writes_labelled_predicted_masks_and_resumes(tmp_path, capsys):
    root = _maskless(tmp_path)
    assert cli(["data", "masks", str(root), "--segmenter", "sam"]) == 2  # no model: one line, exit 2
    assert "segmentation.model is not set" in capsys.readouterr().err
    assert not (root / "train_masks").exists()  # refused before anything was written
    assert cli(["data", "masks", str(root), "--segmenter", "persam", "--model", "tiny"]) == 2
    assert "cannot make train masks itself" in capsys.readouterr().err
    assert cli(["data", "masks", str(root), "segmentation.init=box"]) == 0
    ds = open_dataset(str(root))
    assert ds.has_masks("train") and not ds.has_masks("test")
    info = json.loads((root / ds.info_file).read_text())
    assert info["predicted_masks"]["train"]["status"] == "complete"
    assert info["predicted_masks"]["train"]["segmenter"]["segmenter"] == "grabcut"
    assert set(info["mask_confidence"]) == {f"train_masks/obj{i}/{s}.png" for i in range(2) for s in range(3)}
    truth = disc_photo(size=64, seed=0)[1]
    assert mask_iou(ds.read_mask("train/obj0/0.png"), truth) > 0.8
    report = check_dataset(str(root))
    assert any("predicted by grabcut" in f.problem for f in report.of("note"))
    # again: nothing to do; --test with PerSAM uses the train masks as its reference
    assert cli(["data", "masks", str(root)]) == 0
    assert "already has a mask" in capsys.readouterr().out
    before = (root / "train_masks/obj0/0.png").read_bytes()
    code = cli(["data", "masks", str(root), "--test", "--segmenter", "persam", "--model", "tiny"])
    assert code in (0, 1)  # 1: random-weight SAM masks come with low confidence, and it says so
    assert open_dataset(str(root)).has_masks("test")
    assert (root / "train_masks/obj0/0.png").read_bytes() == before  # never overwritten silently
    info = json.loads((root / ds.info_file).read_text())
    assert info["predicted_masks"]["test"]["segmenter"]["segmenter"] == "persam"


def test_data_masks_resumes_an_interrupted_command(tmp_path, monkeypatch):
    root = _maskless(tmp_path, n=3)
    from persrep.segmentation import dataset as mod
    from persrep.segmentation.grabcut import GrabCutSegmenter

    real, calls = GrabCutSegmenter.segment, {"n": 0}

    def dies_on_second(self, images, reference=None):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, images, reference)

    monkeypatch.setattr(GrabCutSegmenter, "segment", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        mod.write_masks(str(root), SegmentationSettings(init="box"))
    info = json.loads(next(root.glob("*_info.json")).read_text())
    assert info["predicted_masks"]["train"]["status"] == "partial"
    assert check_dataset(str(root)).exit_code >= 1  # partial: a warning (and images without masks)
    monkeypatch.setattr(GrabCutSegmenter, "segment", real)
    res = mod.write_masks(str(root), SegmentationSettings(init="box"))
    assert res.written["train"] == 6 and res.kept["train"] == 3  # obj0 kept, obj1 + obj2 done now
    assert open_dataset(str(root)).has_masks("train")


def test_check_flags_empty_whole_frame_tiny_and_low_confidence_masks(tmp_path):
    root = _maskless(tmp_path, n=1)
    (root / "train_masks/obj0").mkdir(parents=True)
    (root / "test_masks/obj0").mkdir(parents=True)
    full = np.full((64, 64), 255, np.uint8)
    tiny = np.zeros((64, 64), np.uint8)
    tiny[30:32, 30:32] = 255
    good = disc_photo(size=64)[1].astype(np.uint8) * 255
    Image.fromarray(full).save(root / "train_masks/obj0/0.png")
    Image.fromarray(tiny).save(root / "train_masks/obj0/1.png")
    Image.fromarray(good).save(root / "train_masks/obj0/2.png")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(root / "test_masks/obj0/3.png")
    Image.fromarray(good).save(root / "test_masks/obj0/4.png")
    (root / "plain_info.json").write_text(json.dumps({
        "predicted_masks": {"train": {"segmenter": {"segmenter": "grabcut"}, "status": "complete"}},
        "mask_confidence": {"train_masks/obj0/2.png": 0.2, "test_masks/obj0/4.png": 0.9}}))
    report = check_dataset(str(root))
    lines = {f.where.rsplit("/", 2)[-2] + "/" + f.where.rsplit("/", 1)[-1]: f.problem for f in report.of("warning")}
    assert "nearly the whole image" in lines["obj0/0.png"] and "train_masks" in report.of("warning")[0].where
    assert "tiny" in [p for w, p in lines.items() if w == "obj0/1.png"][0]
    warned = [f for f in report.of("warning") if f.where.endswith("train_masks/obj0/2.png")]
    assert warned and "low confidence 0.20" in warned[0].problem
    assert any(f.where.endswith("test_masks/obj0/3.png") and "empty" in f.problem for f in report.of("warning"))
    assert not any(f.where.endswith("test_masks/obj0/4.png") for f in report.findings)
    assert report.exit_code == 1


def test_import_with_auto_masks(tmp_path, capsys):
    src = tmp_path / "photos"
    for i in range(2):
        (src / f"thing{i}").mkdir(parents=True)
        for s in range(4):
            disc_photo(size=64, seed=20 * i + s)[0].save(src / f"thing{i}" / f"{s}.png")
    assert cli(["data", "import", str(src), str(tmp_path / "ds"), "--auto-masks"]) == 0
    assert "train_masks: 6 predicted with grabcut" in capsys.readouterr().out
    ds = open_dataset(str(tmp_path / "ds"))
    assert ds.has_masks("train") and not ds.has_masks("test")
    assert json.loads((tmp_path / "ds" / ds.info_file).read_text())["predicted_masks"]["train"]["status"] == "complete"
    assert mask_iou(ds.read_mask(ds.instances["thing0"].train[0]), disc_photo(size=64, seed=0)[1]) > 0.8
