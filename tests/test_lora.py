"""LoRA adapters: which parameters train, exact save/load round trips, base checks, merging."""

from __future__ import annotations

import json
import os
import struct

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded in tests

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from persrep.config import BackboneSettings, LoraSettings
from persrep.models.backbones import build_backbone
from persrep.models.errors import AdapterFormatError, AdapterMismatchError
from persrep.models.lora import (
    apply_lora,
    default_lora_targets,
    load_adapter,
    lora_parameters,
    merge_lora,
    read_adapter_metadata,
    save_adapter,
)

from worlds import OFFLINE, TINY_DINO
LITE0_TARGETS = [f"blocks.5.{i}.{c}" for i in range(4) for c in ("conv_pw", "conv_pwl")] + [
    "blocks.6.0.conv_pw", "blocks.6.0.conv_pwl", "conv_head"]


def _train_a_few_steps(backbone, size=56, steps=3, feature="cls+mean"):
    """Make LoRA weights nonzero the way training does (train mode, Adam)."""
    backbone.train()
    optimiser = torch.optim.Adam(lora_parameters(backbone), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(4, 3, size, size, generator=generator)
        loss = -torch.nn.functional.normalize(backbone.global_features(x, feature), dim=1)[:, :8].sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return backbone.eval()


@pytest.fixture(scope="module")
def trained_vit(tmp_path_factory):
    backbone = _train_a_few_steps(apply_lora(build_backbone(TINY_DINO), LoraSettings()))
    path = save_adapter(backbone, tmp_path_factory.mktemp("adapters") / "vit.safetensors")
    return backbone, path


def test_only_lora_parameters_train_on_vit_qkv():
    backbone = apply_lora(build_backbone(TINY_DINO), LoraSettings())
    trainable = [n for n, p in backbone.named_parameters() if p.requires_grad]
    assert sorted(trainable) == sorted(f"model.blocks.{b}.attn.qkv.lora_{ab}.default.weight"
                                       for b in range(2) for ab in "AB")
    qkv = backbone.model.blocks[0].attn.qkv
    assert qkv.r["default"] == 16 and qkv.scaling["default"] == pytest.approx(0.5 / 16)
    assert qkv.lora_dropout["default"].p == pytest.approx(0.3)
    backbone.global_features(torch.randn(1, 3, 56, 56)).sum().backward()  # batch of 1 trains too
    assert all(p.grad is None for n, p in backbone.named_parameters() if "lora_" not in n)
    assert qkv.lora_A["default"].weight.grad is not None


def test_vit_adapter_round_trip_is_exact(trained_vit):
    trained, path = trained_vit
    assert trained.model.blocks[1].attn.qkv.lora_B["default"].weight.abs().max() > 0
    x = torch.randn(2, 3, 70, 84, generator=torch.Generator().manual_seed(1))
    base = build_backbone(TINY_DINO)
    with torch.no_grad():
        expected, plain = trained.global_features(x, "cls+mean"), base.global_features(x, "cls+mean")
        restored = load_adapter(base, path)
        assert (restored.global_features(x, "cls+mean") - expected).abs().max().item() < 1e-6
        torch.testing.assert_close(restored.dense_features(x), trained.dense_features(x), atol=1e-6, rtol=0)
    assert (expected - plain).abs().max() > 1e-4  # the adapter actually changes the features


def test_adapter_file_is_plain_safetensors_with_base_identity(trained_vit):
    trained, path = trained_vit
    raw = path.read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + header_len])  # safetensors: JSON header, then raw tensors
    assert header["__metadata__"]["format"] == "persrep-lora-v1"
    meta = read_adapter_metadata(path)
    assert meta["base_identity"] == trained.identity
    assert meta["lora"]["rank"] == 16 and meta["lora"]["target_modules"][0].endswith("attn.qkv")
    assert not path.with_name(path.name + ".partial").exists()


def test_adapter_refuses_a_different_architecture(trained_vit):
    _, path = trained_vit
    other = build_backbone(BackboneSettings(name="vit_small_patch14_dinov2.lvd142m", weights="tiny"))
    with pytest.raises(AdapterMismatchError, match="vit_base_patch14_dinov2.lvd142m.*vit_small_patch14_dinov2"):
        load_adapter(other, path)
    assert other.lora_settings is None  # nothing was injected


def test_cnn_lora_targets_last_stages_pointwise_convs_and_round_trips(tmp_path):
    backbone = build_backbone(OFFLINE)
    assert default_lora_targets(backbone) == LITE0_TARGETS
    apply_lora(backbone, LoraSettings())
    assert {n.split(".lora_")[0].removeprefix("model.") for n, p in backbone.named_parameters()
            if p.requires_grad} == set(LITE0_TARGETS)
    bn_stats = backbone.model.blocks[6][0].bn1.running_mean.clone()
    _train_a_few_steps(backbone, size=64, steps=2)
    # the frozen base keeps its BatchNorm statistics, else the adapter alone could not reproduce it
    assert torch.equal(backbone.model.blocks[6][0].bn1.running_mean, bn_stats)
    path = save_adapter(backbone, tmp_path / "lite0.safetensors")
    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        restored = load_adapter(build_backbone(OFFLINE), path)
        diff = (restored.global_features(x, "cls+mean") - backbone.global_features(x, "cls+mean")).abs().max()
    assert diff.item() < 1e-6


def test_adapter_refuses_same_name_with_other_weights(tmp_path):
    from safetensors.torch import save_file

    source = apply_lora(build_backbone(OFFLINE), LoraSettings())
    path = save_adapter(source, tmp_path / "lite0.safetensors")
    state = {k: v.contiguous() for k, v in build_backbone(OFFLINE).model.state_dict().items()}
    state["conv_stem.weight"] = state["conv_stem.weight"] * 1.01
    save_file(state, str(tmp_path / "model.safetensors"))
    retrained = build_backbone(BackboneSettings(name="tf_efficientnet_lite0", weights=str(tmp_path)))
    with pytest.raises(AdapterMismatchError, match="sha256"):
        load_adapter(retrained, path)
    with pytest.raises(AdapterMismatchError, match="weights_source 'offline' != 'tiny'"):
        load_adapter(build_backbone(BackboneSettings(name="tf_efficientnet_lite0", weights="tiny")), path)


@torch.no_grad()
def test_merge_gives_the_same_features_without_lora_layers(trained_vit):
    _, path = trained_vit
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    adapted = load_adapter(build_backbone(TINY_DINO), path)
    expected = adapted.global_features(x)
    merged = merge_lora(adapted)
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    torch.testing.assert_close(merged.global_features(x), expected, atol=1e-5, rtol=0)
    with pytest.raises(AdapterFormatError, match="no LoRA adapter"):
        save_adapter(merged, path.with_name("merged.safetensors"))


def test_lora_misuse_fails_clearly(tmp_path):
    backbone = build_backbone(TINY_DINO)
    with pytest.raises(AdapterFormatError, match="do not match"):
        apply_lora(backbone, LoraSettings(target_modules=["no_such_layer"]))
    apply_lora(build_backbone(TINY_DINO), LoraSettings())
    twice = apply_lora(build_backbone(TINY_DINO), LoraSettings())
    with pytest.raises(AdapterFormatError, match="already has"):
        apply_lora(twice, LoraSettings())
    not_adapter = tmp_path / "x.safetensors"
    not_adapter.write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterFormatError, match="not a safetensors file"):
        load_adapter(build_backbone(TINY_DINO), not_adapter)
