"""LoRA adapters on a :class:`~persrep.models.backbones.Backbone`: apply, save, load, merge.

Targets (``LoraSettings.target_modules=None``):

- ViTs: every attention ``qkv`` projection, no bias, as in the reference (r=16, alpha=0.5,
  dropout 0.3).
- CNNs: the pointwise (1x1, ungrouped) convolutions of the last two stages plus the 1x1 head conv
  that produces the feature map (EfficientNet-Lite0: ``conv_pw``/``conv_pwl`` of ``blocks.5`` and
  ``blocks.6`` and ``conv_head``, 11 layers). Pointwise convs hold most of a mobile CNN's channel
  mixing, the last stages hold its instance-level semantics, and early layers stay generic.
  CNNs without ``blocks`` stages use the pointwise convs of timm's last ``feature_info`` stage.

An adapter file is safetensors only (no pickle): the LoRA tensors plus metadata holding the base
backbone's identity (timm name, weights source and sha256) and the LoRA settings, so loading it
onto a different base fails loudly instead of giving silently wrong features.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from peft import (LoraConfig, get_peft_model_state_dict, inject_adapter_in_model,
                  set_peft_model_state_dict)
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from persrep.config import LoraSettings
from persrep.models.backbones import Backbone
from persrep.models.errors import AdapterFormatError, AdapterMismatchError

ADAPTER_FORMAT = "persrep-lora-v1"
_META_FORMAT, _META_BASE, _META_LORA = "format", "persrep.base_identity", "persrep.lora"
# identity fields that must agree between an adapter's base and the backbone it is loaded onto
_IDENTITY_FIELDS = ("timm_name", "weights_source", "init_seed", "timm_version", "tiny_overrides",
                    "merged_adapter")


def _is_pointwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1


def default_lora_targets(backbone: Backbone) -> list[str]:
    """Full module names that get LoRA when ``target_modules`` is not set (see module doc)."""
    model = backbone.model
    if backbone.is_token_model:
        names = [n for n, m in model.named_modules()
                 if n.rpartition(".")[2] == "qkv" and isinstance(m, nn.Linear)]
        if not names:
            raise AdapterFormatError(f"{backbone.settings.name}: no attention 'qkv' Linear layers; "
                                     "set lora.target_modules to the projections to adapt")
        return names
    if isinstance(getattr(model, "blocks", None), nn.Sequential) and len(model.blocks) >= 2:
        scopes = [f"blocks.{len(model.blocks) - 2}.", f"blocks.{len(model.blocks) - 1}."]
        names = [n for n, m in model.named_modules()
                 if _is_pointwise(m) and any(n.startswith(s) for s in scopes)]
        if _is_pointwise(getattr(model, "conv_head", None)):
            names.append("conv_head")
    else:
        info = getattr(model, "feature_info", None)
        last_stage = info[-1]["module"] + "." if info else None
        names = [n for n, m in model.named_modules()
                 if last_stage and n.startswith(last_stage) and _is_pointwise(m)]
    if not names:
        raise AdapterFormatError(f"{backbone.settings.name}: no default LoRA targets found for "
                                 "this CNN; set lora.target_modules to the layer names to adapt")
    return names


def apply_lora(backbone: Backbone, settings: LoraSettings) -> Backbone:
    """Inject LoRA layers in place; freeze everything else. Returns the same backbone."""
    if backbone.lora_settings is not None:
        raise AdapterFormatError(f"{backbone.settings.name} already has a LoRA adapter; build a "
                                 "fresh backbone to apply another")
    targets = list(settings.target_modules or default_lora_targets(backbone))
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=targets, bias="none")
    try:
        inject_adapter_in_model(config, backbone.model)
    except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
        raise AdapterFormatError(f"{backbone.settings.name}: LoRA target_modules {targets} do not "
                                 f"match its layers ({str(exc).splitlines()[0][:160]})") from None
    # inject_adapter_in_model already freezes the base; make it explicit and independent of peft
    for name, param in backbone.model.named_parameters():
        param.requires_grad = "lora_" in name
    backbone.lora_settings = {"rank": settings.rank, "alpha": settings.alpha,
                              "dropout": settings.dropout, "target_modules": targets}
    backbone.base_frozen = True
    return backbone.train(backbone.training)  # re-apply: frozen BatchNorm stays in eval mode


def lora_parameters(backbone: Backbone) -> list[nn.Parameter]:
    """The trainable parameters (what the optimiser gets)."""
    return [p for p in backbone.parameters() if p.requires_grad]


def lora_state_dict(backbone: Backbone) -> dict[str, torch.Tensor]:
    _require_lora(backbone)
    return get_peft_model_state_dict(backbone.model)


def save_adapter(backbone: Backbone, path: str | os.PathLike,
                 base_identity: dict[str, Any] | None = None) -> Path:
    """Write the LoRA tensors and the base identity to a ``.safetensors`` file (atomically)."""
    _require_lora(backbone)
    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in lora_state_dict(backbone).items()}
    metadata = {_META_FORMAT: ADAPTER_FORMAT,
                _META_BASE: json.dumps(base_identity or backbone.identity, sort_keys=True),
                _META_LORA: json.dumps(backbone.lora_settings, sort_keys=True)}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata=metadata)
    os.replace(partial, path)  # a crash never leaves a half-written file under the final name
    return path


def read_adapter_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """``{"base_identity": {...}, "lora": {...}}`` from an adapter file, without loading tensors."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
    except FileNotFoundError:
        raise AdapterFormatError(f"adapter {path}: file not found") from None
    except Exception as exc:  # safetensors raises its own error type for non-safetensors files
        raise AdapterFormatError(f"adapter {path}: not a safetensors file ({exc})") from None
    if meta.get(_META_FORMAT) != ADAPTER_FORMAT:
        raise AdapterFormatError(f"adapter {path}: metadata format {meta.get(_META_FORMAT)!r}, "
                                 f"expected {ADAPTER_FORMAT!r} (written by persrep save_adapter)")
    return {"base_identity": json.loads(meta[_META_BASE]), "lora": json.loads(meta[_META_LORA])}


def identity_mismatches(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """Differences that make an adapter invalid on a base. Weights compare by sha256 when both
    sides have one (paths differ across machines), else by the weights string (hub id)."""
    problems = [f"{field} {expected.get(field)!r} != {actual.get(field)!r}"
                for field in _IDENTITY_FIELDS if expected.get(field) != actual.get(field)]
    if expected.get("weights_sha256") and actual.get("weights_sha256"):
        if expected["weights_sha256"] != actual["weights_sha256"]:
            problems.append(f"weights sha256 {expected['weights_sha256'][:12]} != "
                            f"{actual['weights_sha256'][:12]}")
    elif expected.get("weights") != actual.get("weights"):
        problems.append(f"weights {expected.get('weights')!r} != {actual.get('weights')!r}")
    return problems


def check_fraction(value: float, what: str) -> None:
    """``ValueError`` naming ``what`` unless ``0 <= value <= 1`` (the adapter scale, the pretrained
    share: the settings layer checks both first; this guards library callers)."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{what} {value}: need 0 <= {what.split()[-1]} <= 1")


def check_scale(scale: float) -> None:
    check_fraction(scale, "adapter scale")


def scale_lora(tensors: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """An adapter's tensors with every LoRA update ``B @ A`` multiplied by ``scale`` (``lora_B``
    scaled): what :func:`load_adapter` and ``persrep find`` apply for ``evaluation.adapter_scale``."""
    check_scale(scale)
    if scale == 1.0:
        return tensors
    return {k: v * scale if ".lora_B." in k else v for k, v in tensors.items()}


def load_adapter(backbone: Backbone, path: str | os.PathLike, scale: float = 1.0) -> Backbone:
    """Apply the adapter in ``path`` to a freshly built base; fail if it was made for another
    base (checked before anything is changed). ``scale`` < 1 weakens the adapter: every LoRA
    update ``B @ A`` is multiplied by it (``evaluation.adapter_scale``, WiSE-FT-style
    interpolation between the pretrained weights at 0 and the trained adapter at 1)."""
    check_scale(scale)
    meta = read_adapter_metadata(path)
    problems = identity_mismatches(meta["base_identity"], backbone.identity)
    if problems:
        raise AdapterMismatchError(
            f"adapter {path} was trained on base {meta['base_identity'].get('timm_name')} "
            f"({meta['base_identity'].get('weights')}), not on this backbone "
            f"{backbone.identity.get('timm_name')} ({backbone.identity.get('weights')}): "
            + "; ".join(problems))
    apply_lora(backbone, LoraSettings(**meta["lora"]))
    device = next(backbone.parameters()).device
    with safe_open(str(path), framework="pt", device=str(device)) as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    expected = set(lora_state_dict(backbone))
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise AdapterFormatError(f"adapter {path}: tensors do not fit the LoRA layers "
                                 f"(missing {missing[:3]}, unexpected {extra[:3]})")
    tensors = scale_lora(tensors, scale)
    try:
        set_peft_model_state_dict(backbone.model, tensors)
    except RuntimeError as exc:  # shape mismatches
        raise AdapterFormatError(f"adapter {path}: {str(exc).splitlines()[0][:200]}") from None
    return backbone.eval()


def merge_lora(backbone: Backbone) -> Backbone:
    """Fold the LoRA deltas into the base weights and remove the LoRA layers (faster inference).

    The result is no longer the plain base: its identity records ``merged_adapter``, so an
    adapter trained on top of it will not load onto a fresh base.
    """
    _require_lora(backbone)
    for name, module in list(backbone.model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = backbone.model.get_submodule(parent_name) if parent_name else backbone.model
            setattr(parent, child, module.get_base_layer())
    if hasattr(backbone.model, "peft_config"):
        del backbone.model.peft_config
    backbone.lora_settings = None
    backbone.identity = {**backbone.identity, "merged_adapter": True}
    return backbone


def _require_lora(backbone: Backbone) -> None:
    if backbone.lora_settings is None:
        raise AdapterFormatError(f"{backbone.settings.name} has no LoRA adapter (apply_lora first; "
                                 "a merged backbone has none left)")
