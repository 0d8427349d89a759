"""Perceptual filtering: scorers keep look-alikes and reject noise; filter_until's bookkeeping."""

from __future__ import annotations

import sys
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from persrep.generation.base import InstanceData, SampledImage, SampleRow
from persrep.hashing import stable_seed
from persrep.generation.filtering import (ScorerUnavailableError, attempt_seed, filter_until, make_scorer,
                                          mask_box_crop, scorer_names)

SIZE = 64


def object_photo(shift: int) -> tuple[Image.Image, Image.Image]:
    """A grey photo with a striped, two-coloured object (shifted a little per photo), and its mask."""
    pixels = np.full((SIZE, SIZE, 3), 120, np.uint8)
    top, left = 14 + shift, 12 + shift
    obj = np.zeros((34, 30, 3), np.uint8)
    obj[..., 0] = np.linspace(40, 240, 30)[None, :]
    obj[::6, :, 1] = 220  # stripes
    obj[17:, :, 2] = 200
    pixels[top:top + 34, left:left + 30] = obj
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[top:top + 34, left:left + 30] = 255
    return Image.fromarray(pixels), Image.fromarray(mask)


def make_instance() -> InstanceData:
    pairs = [object_photo(s) for s in (0, 3, 6)]
    return InstanceData("toy_1", "toy", [p for p, _ in pairs], [m for _, m in pairs])


def augmented(image: Image.Image, mask: Image.Image) -> tuple[Image.Image, Image.Image]:
    """A lightly augmented copy and its mask: 90 % crop resized back, brighter, more saturated."""
    w, h = image.size
    box = (3, 2, w - 3, h - 4)
    crop = image.crop(box).resize((w, h), Image.Resampling.BILINEAR)
    jittered = ImageEnhance.Color(ImageEnhance.Brightness(crop).enhance(1.12)).enhance(1.1)
    return jittered, mask.crop(box).resize((w, h), Image.Resampling.NEAREST)


def noise(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def tiny_features(images: list[Image.Image]) -> torch.Tensor:
    """A fixed, simple embedding: the 12x12 thumbnail with its mean removed."""
    thumbs = np.stack([np.asarray(i.convert("RGB").resize((12, 12), Image.Resampling.BILINEAR), np.float32)
                       for i in images]).reshape(len(images), -1)
    return torch.from_numpy(thumbs - thumbs.mean(axis=1, keepdims=True))


def rows(n: int) -> list[SampleRow]:
    return [SampleRow("toy_1", "positive", "dreambooth", "a photo of <new1> toy", 5.0, seed=50 + i, index=i)
            for i in range(n)]


# ---------------------------------------------------------------------------------------------
# scorers
def test_embedding_filter_keeps_a_look_alike_and_rejects_noise():
    instance = make_instance()
    scorer = make_scorer("embedding", instance, feature_fn=tiny_features)
    look_alike, mask = augmented(instance.train_images[1], instance.train_masks[1])
    good, bad = scorer.score([look_alike, noise(3)], [mask, None])
    assert good > 0.6 > bad  # 0.6: the reference's DreamSim threshold

    # through filter_until: a generator that makes noise except for some seeds
    def generate(batch):
        return [SampledImage(look_alike, mask, r) if r.seed % 3 == 0 else SampledImage(noise(r.seed), None, r)
                for r in batch]

    result = filter_until(generate, scorer, rows(6), threshold=0.6, max_attempts_per_image=20)
    kept = result.kept
    assert [a.target for a in kept] == list(range(6))
    assert all(a.row.seed % 3 == 0 and a.sample.image is look_alike for a in kept)
    assert all(not a.kept and a.row.seed % 3 != 0 for a in result.attempts if not a.kept)


def test_default_embedding_uses_the_real_offline_backbone():
    instance = make_instance()
    scorer = make_scorer("embedding", instance, image_size=96, device="cpu")
    look_alike, mask = augmented(instance.train_images[2], instance.train_masks[2])
    same, similar, static = scorer.score([instance.train_images[0], look_alike, noise(1)],
                                         [instance.train_masks[0], mask, None])
    assert same > similar > static
    assert similar - static > 0.2


def test_scores_use_the_mask_box_of_both_images():
    instance = make_instance()
    scorer = make_scorer("embedding", instance, feature_fn=tiny_features)
    # the object pasted small into a noise canvas: recognisable only when cropped to its mask box
    canvas = np.asarray(noise(9)).copy()
    obj = np.asarray(mask_box_crop(*object_photo(0)).resize((20, 22)))
    canvas[30:52, 36:56] = obj
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[30:52, 36:56] = 255
    image = Image.fromarray(canvas)
    with_mask, without = scorer.score([image, image], [Image.fromarray(mask), None])
    assert with_mask > 0.6 > without
    assert mask_box_crop(image, Image.fromarray(mask)).size == (20, 22)
    assert mask_box_crop(image, Image.new("L", (SIZE, SIZE), 0)).size == (SIZE, SIZE)  # empty mask


def test_lpips_with_a_random_backbone_orders_identical_above_noise():
    instance = make_instance()
    scorer = make_scorer("lpips", instance, random_backbone=True, size=SIZE, device="cpu")
    again = make_scorer("lpips", instance, random_backbone=True, size=SIZE, device="cpu")
    images = [instance.train_images[0], noise(2)]
    masks = [instance.train_masks[0], None]
    identical, static = scorer.score(images, masks)
    assert identical > static
    assert again.score(images, masks) == pytest.approx([identical, static], abs=1e-6)  # seeded backbone


def test_lpips_offline_failure_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache

    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ScorerUnavailableError) as info:
        make_scorer("lpips", make_instance())
    message = str(info.value)
    assert "\n" not in message
    assert "alexnet-owt-7be5be79.pth" in message and str(tmp_path / "hub" / "checkpoints") in message
    assert "TORCH_HOME" in message and "scorer=embedding" in message


def test_dreamsim_without_the_package_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "dreamsim", None)  # import fails as if not installed
    with pytest.raises(ScorerUnavailableError) as info:
        make_scorer("dreamsim", make_instance())
    assert "\n" not in str(info.value)
    assert "pip install dreamsim" in str(info.value) and "scorer=embedding" in str(info.value)


def test_unknown_scorer_names_the_choices():
    with pytest.raises(ValueError, match="unknown filter scorer 'clip'") as info:
        make_scorer("clip", make_instance())
    for name in ("dreamsim", "embedding", "lpips"):
        assert name in str(info.value) and name in scorer_names()


# ---------------------------------------------------------------------------------------------
# filter_until bookkeeping
def seeded_score(sample: SampledImage) -> float:
    return (stable_seed("score", sample.row.seed) % 1000) / 1000  # uniform-ish in [0, 1)


def run_filter(batch_rows, threshold=0.7, max_attempts=4, calls=None):
    def generate(batch):
        if calls is not None:
            calls.append([r.seed for r in batch])
        return [SampledImage(Image.new("RGB", (4, 4)), None, r) for r in batch]

    return filter_until(generate, lambda samples: [seeded_score(s) for s in samples], batch_rows,
                        threshold=threshold, max_attempts_per_image=max_attempts)


def test_every_attempt_is_recorded_with_its_score_and_verdict():
    requested = rows(20)
    calls: list[list[int]] = []
    result = run_filter(requested, calls=calls)
    assert len(calls) <= 4 and sum(map(len, calls)) == len(result.attempts)
    for a in result.attempts:
        assert a.kept == (a.score >= 0.7)
        assert a.score == seeded_score(SampledImage(None, None, a.row))
        assert a.row.seed == attempt_seed(requested[a.target].seed, a.attempt)
        assert (a.sample is not None) == a.kept  # rejected pixels dropped by default
        assert a.record()["score"] == a.score and a.record()["target"] == a.target
    by_target = {t: [a for a in result.attempts if a.target == t] for t in range(20)}
    for target, attempts in by_target.items():
        assert [a.attempt for a in attempts] == list(range(len(attempts)))
        assert 1 <= len(attempts) <= 4  # max attempts respected
        assert sum(a.kept for a in attempts) <= 1 and all(not a.kept for a in attempts[:-1])
        if not attempts[-1].kept:  # exhausted: used every attempt
            assert len(attempts) == 4 and target in result.exhausted(20)
    assert attempt_seed(77, 0) == 77 and attempt_seed(77, 2) == stable_seed(77, 2)
    assert result.exhausted(20) and result.kept  # this threshold gives both outcomes
    assert 0 < result.acceptance_rate < 1


def test_a_row_filters_the_same_alone_as_in_a_batch():
    requested = rows(12)
    batch = run_filter(requested)
    for t in (0, 5, 11):
        alone = run_filter([requested[t]])
        mine = [(a.attempt, a.row.seed, a.score, a.kept) for a in batch.attempts if a.target == t]
        assert [(a.attempt, a.row.seed, a.score, a.kept) for a in alone.attempts] == mine


def test_filter_until_checks_its_inputs():
    with pytest.raises(ValueError, match="max_attempts_per_image=0"):
        run_filter(rows(2), max_attempts=0)
    with pytest.raises(ValueError, match="one per row"):
        filter_until(lambda batch: [], lambda samples: [], rows(2), 0.5, 3)
    nan = filter_until(lambda b: [SampledImage(Image.new("RGB", (4, 4)), None, r) for r in b],
                       lambda samples: [float("nan")] * len(samples), rows(2), -1.0, 2)
    assert not any(a.kept for a in nan.attempts) and len(nan.attempts) == 4
