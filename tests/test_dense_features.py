"""Hypercolumn dense features for CNNs (the demo's dense head): definition, resolution, and that a
personalised adapter changes them (LoRA sits in the last stages, half of the feature)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from persrep.config import BackboneSettings, EvaluationSettings, LoraSettings, load_settings
from persrep.evaluation.features import WithGlobalFeature
from persrep.models.backbones import build_backbone
from persrep.models.lora import apply_lora

OFFLINE = BackboneSettings(name="tf_efficientnet_lite0", weights="offline")


@pytest.fixture(scope="module")
def lite0():
    return build_backbone(OFFLINE).eval()


@torch.no_grad()
def test_hypercolumn_is_the_stride16_stage_and_the_upsampled_last_map(lite0):
    x = torch.randn(2, 3, 256, 256)
    hyper = lite0.dense_features(x, "hypercolumn")
    assert hyper.shape == (2, 112 + 1280, 16, 16)  # twice the last map's 8 x 8
    # oracle: the stages run by hand (stem, blocks, head), independent of forward_intermediates
    m = lite0.model
    h = m.bn1(m.conv_stem(x))
    for i, blk in enumerate(m.blocks):
        h = blk(h)
        if i == 4:
            mid = h
    last = m.bn2(m.conv_head(h))
    torch.testing.assert_close(last, lite0.dense_features(x))  # "last" is unchanged
    torch.testing.assert_close(hyper[:, :112], F.normalize(mid, dim=1))
    up = F.interpolate(F.normalize(last, dim=1), size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(hyper[:, 112:], F.normalize(up, dim=1))
    assert torch.allclose(hyper.norm(dim=1), torch.full((2, 16, 16), 2 ** 0.5), atol=1e-4)


@torch.no_grad()
def test_vits_ignore_the_mode():
    vit = build_backbone(BackboneSettings(name="vit_base_patch14_dinov2.lvd142m", weights="tiny")).eval()
    x = torch.randn(1, 3, 112, 112)
    torch.testing.assert_close(vit.dense_features(x, "hypercolumn"), vit.dense_features(x))
    with pytest.raises(ValueError, match="hypercolumn"):
        vit.dense_features(x, "finest")


@torch.no_grad()
def test_an_adapter_changes_the_last_map_half_only(lite0):
    tuned = apply_lora(build_backbone(OFFLINE), LoraSettings(rank=4, dropout=0.0)).eval()
    torch.manual_seed(0)
    for name, p in tuned.named_parameters():
        if "lora_B" in name:
            p.normal_(0, 0.05)  # a trained adapter (lora_B starts at zero)
    x = torch.randn(1, 3, 256, 256)
    a, b = lite0.dense_features(x, "hypercolumn"), tuned.dense_features(x, "hypercolumn")
    torch.testing.assert_close(a[:, :112], b[:, :112])  # blocks 0-4 carry no LoRA
    assert (a[:, 112:] - b[:, 112:]).abs().max() > 1e-3


def test_the_evaluation_extractor_uses_the_setting(lite0):
    assert EvaluationSettings().dense_features == "hypercolumn"
    assert load_settings("local", ["evaluation.dense_features=last"]).evaluation.dense_features == "last"
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        assert WithGlobalFeature(lite0, "cls", "hypercolumn").dense_features(x).shape[1] == 1392
        assert WithGlobalFeature(lite0, "cls").dense_features(x).shape[1] == 1280
