"""Backbones: feature shapes and meaning, weights sources, preprocessing, identity."""

from __future__ import annotations

import os
import pickle

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded in tests

import pytest
import timm
import torch
from PIL import Image

from persrep.config import BackboneSettings
from persrep.models.backbones import (
    PAPER_BACKBONES,
    Backbone,
    backbone_identity,
    build_backbone,
    eval_transform,
    train_transform,
)
from persrep.models.errors import UnknownBackboneError, WeightsUnavailableError

from worlds import OFFLINE, TINY_DINO


@pytest.fixture(scope="module")
def tiny_vit() -> Backbone:
    return build_backbone(TINY_DINO)


@pytest.fixture(scope="module")
def lite0() -> Backbone:
    return build_backbone(OFFLINE)


@torch.no_grad()
@pytest.mark.parametrize("batch", [1, 3])
def test_tiny_vit_global_features_match_their_definition(tiny_vit, batch):
    x = torch.randn(batch, 3, 224, 224)
    cls = tiny_vit.global_features(x, "cls")
    both = tiny_vit.global_features(x, "cls+mean")
    dense = tiny_vit.dense_features(x)
    assert cls.shape == (batch, 64) and both.shape == (batch, 128)
    assert tiny_vit.feature_dim("cls+mean") == 128
    assert dense.shape == (batch, 64, 16, 16)  # 224 / patch 14
    torch.testing.assert_close(both[:, :64], cls)
    # the second half is the mean of exactly the patch tokens that dense_features returns
    torch.testing.assert_close(both[:, 64:], dense.mean(dim=(2, 3)))


@torch.no_grad()
def test_register_tokens_are_not_patches():
    reg = build_backbone(BackboneSettings(name="vit_small_patch14_reg4_dinov2.lvd142m", weights="tiny"))
    assert reg.model.num_prefix_tokens == 5
    x = torch.randn(1, 3, 112, 140)  # non-square: grid 8 x 10
    dense = reg.dense_features(x)
    assert dense.shape == (1, 64, 8, 10)
    torch.testing.assert_close(reg.global_features(x, "cls+mean")[:, 64:], dense.mean(dim=(2, 3)))


@torch.no_grad()
def test_vit_dense_features_at_896_px(tiny_vit):
    dense = tiny_vit.dense_features(torch.randn(1, 3, 896, 896))
    assert dense.shape == (1, 64, 64, 64)


def test_unknown_feature_mode_is_rejected(tiny_vit):
    with pytest.raises(ValueError, match="cls\\+mean"):
        tiny_vit.global_features(torch.randn(1, 3, 56, 56), "mean")


@torch.no_grad()
def test_cnn_features_are_pooled_feature_maps(lite0):
    x = torch.randn(1, 3, 224, 224)
    dense = lite0.dense_features(x)
    assert dense.shape == (1, 1280, 7, 7)
    cls, both = lite0.global_features(x, "cls"), lite0.global_features(x, "cls+mean")
    assert cls.shape == (1, 1280) and both.shape == (1, 2560)
    torch.testing.assert_close(cls, dense.mean(dim=(2, 3)))
    torch.testing.assert_close(both[:, 1280:], dense.amax(dim=(2, 3)))
    assert lite0.dense_features(torch.randn(2, 3, 448, 448)).shape == (2, 1280, 14, 14)


@torch.no_grad()
def test_offline_weights_recognise_a_real_teapot(lite0, shared_data):
    photo = shared_data / "dreambooth" / "teapot" / "0.jpg"
    if not photo.is_file():
        pytest.skip(f"{photo} not present")
    x = eval_transform(OFFLINE)(Image.open(photo))[None]
    top5 = lite0.model(x).topk(5).indices[0].tolist()
    assert 849 in top5, f"ImageNet 'teapot' (849) not in top-5 {top5}"


def test_offline_source_only_fits_efficientnet_lite0():
    with pytest.raises(UnknownBackboneError, match="tf_efficientnet_lite0"):
        build_backbone(BackboneSettings(name="resnet18", weights="offline"))


def test_unknown_name_suggests_close_timm_names():
    with pytest.raises(UnknownBackboneError, match="vit_base_patch14_dinov2"):
        build_backbone(BackboneSettings(name="vit_base_patch14_dinov3x", weights="tiny"))


def test_missing_hub_weights_fail_with_one_actionable_line(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(WeightsUnavailableError) as info:
        build_backbone(BackboneSettings(name="vit_base_patch16_224.mae",
                                        weights="timm/vit_base_patch16_224.mae"))
    message = str(info.value)
    assert "\n" not in message
    for needed in ("vit_base_patch16_224.mae", "timm/vit_base_patch16_224.mae", str(tmp_path / "hub"),
                   "model.safetensors", "pytorch_model.bin", "HF_HOME"):
        assert needed in message


@torch.no_grad()
def test_hub_weights_load_offline_from_a_prepopulated_cache(monkeypatch, tmp_path):
    """The documented remedy works: a filled HF cache, no network, timm-format weights."""
    import huggingface_hub.constants as hf
    from safetensors.torch import save_file

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path))
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0,
                               dynamic_img_size=True).eval()
    repo = tmp_path / "models--someone--tiny-vit"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()},
              str(repo / "snapshots" / ("0" * 40) / "model.safetensors"))
    loaded = build_backbone(BackboneSettings(name="vit_tiny_patch16_224", weights="someone/tiny-vit"))
    x = torch.randn(1, 3, 64, 80)
    assert torch.equal(loaded.model.forward_features(x), source.forward_features(x))
    assert loaded.identity["weights_source"] == "hub"


def test_missing_local_path_is_a_clear_error():
    with pytest.raises(WeightsUnavailableError, match="no such file"):
        build_backbone(BackboneSettings(name="tf_efficientnet_lite0", weights="/nope/model.safetensors"))


@torch.no_grad()
@pytest.mark.parametrize("layout", ["dir-safetensors", "file-pth"])
def test_local_weights_reproduce_the_source_model(lite0, tmp_path, layout):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in lite0.model.state_dict().items()}
    if layout == "dir-safetensors":
        save_file(state, str(tmp_path / "model.safetensors"))
        weights = str(tmp_path)
    else:
        torch.save(state, tmp_path / "lite0.pth")
        weights = str(tmp_path / "lite0.pth")
    local = build_backbone(BackboneSettings(name="tf_efficientnet_lite0", weights=weights))
    x = torch.randn(1, 3, 96, 96)
    torch.testing.assert_close(local.global_features(x), lite0.global_features(x))
    assert local.identity["weights_source"] == "local" and len(local.identity["weights_sha256"]) == 64


def test_tiny_weights_are_deterministic_and_leave_global_rng_alone():
    torch.manual_seed(7)
    expected_next = torch.rand(1)
    torch.manual_seed(7)
    first = build_backbone(TINY_DINO)
    assert torch.equal(torch.rand(1), expected_next)
    second = build_backbone(TINY_DINO)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name


def test_identity_is_stable_and_distinguishes_sources():
    offline = backbone_identity(OFFLINE)
    assert offline == backbone_identity(OFFLINE)
    assert offline["weights_sha256"].startswith("57934424")  # the packaged file's name says so
    tiny_lite0 = backbone_identity(BackboneSettings(name="tf_efficientnet_lite0", weights="tiny"))
    assert tiny_lite0["weights_source"] == "tiny" and tiny_lite0["weights_sha256"] is None
    hub = backbone_identity(BackboneSettings(name="vit_base_patch16_224.mae",
                                             weights="hf-hub:timm/vit_base_patch16_224.mae"))
    assert hub["weights_source"] == "hub" and hub["weights"] == "timm/vit_base_patch16_224.mae"


def test_paper_backbones_are_timm_architectures():
    assert {p.label for p in PAPER_BACKBONES.values()} == {"DINOv2 ViT-B/14", "CLIP ViT-B/16", "MAE ViT-B/16"}
    for name, paper in PAPER_BACKBONES.items():
        assert timm.is_model(name) and paper.hub_id == f"timm/{name}"
        shallow = timm.create_model(name, pretrained=False, depth=1, num_classes=0)
        assert shallow.num_features == 768
    dinov2 = build_backbone(BackboneSettings(name="vit_base_patch14_dinov2.lvd142m", weights="none"))
    with torch.no_grad():
        assert dinov2.global_features(torch.randn(1, 3, 224, 224), "cls+mean").shape == (1, 1536)


def _geometry(transform):
    return [(type(t).__name__, getattr(t, "size", None)) for t in transform.transforms
            if type(t).__name__ in ("Resize", "CenterCrop")]


def test_eval_transform_follows_the_reference_geometry():
    dino = BackboneSettings(name="vit_base_patch14_dinov2.lvd142m", weights="tiny")
    clip = BackboneSettings(name="vit_base_patch16_clip_224.openai", weights="tiny")
    assert _geometry(eval_transform(dino)) == [("Resize", 256), ("CenterCrop", (224, 224))]
    assert _geometry(eval_transform(clip)) == [("Resize", 224), ("CenterCrop", (224, 224))]
    big = dino.model_copy(update={"image_size": 448})
    assert _geometry(eval_transform(big)) == [("Resize", 512), ("CenterCrop", (448, 448))]
    gray = Image.new("L", (320, 240), color=128)  # grayscale input is converted to RGB
    out = eval_transform(clip)(gray)
    assert out.shape == (3, 224, 224)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor((128 / 255 - 0.48145466) / 0.26862954))
    assert eval_transform(dino, size=896, center_crop=False)(gray).shape == (3, 896, 896)


def test_train_transform_augments_and_pickles():
    transform = train_transform(TINY_DINO)
    image = Image.effect_noise((300, 260), 64).convert("RGB")
    a, b = transform(image), transform(image)
    assert a.shape == b.shape == (3, 224, 224) and not torch.equal(a, b)
    restored = pickle.loads(pickle.dumps(transform))
    assert restored(image).shape == (3, 224, 224)
