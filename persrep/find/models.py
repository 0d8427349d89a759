"""The extractors of one find scan on ONE loaded backbone.

A find job embeds every photo once per *model*: the pretrained backbone and/or one adapter per
instance. Loading a backbone copy per instance would cost (instances x backbone) memory, so the
backbone is built once, LoRA layers are injected once (every adapter of a run has the same LoRA
layout), and each adapter's small LoRA tensors are swapped in before its forward. The pretrained
model is the same network with every ``lora_B`` set to zero (its LoRA delta is exactly 0).

Shared trunk: a CNN whose adapters touch only its last blocks (the default LoRA targets of
EfficientNet: the last two blocks' pointwise convs and ``conv_head``) runs its stem and earlier
blocks once per batch for every model; only the adapted tail runs per model. Checked once at
load time against the plain forward (max abs difference <= 1e-4, else sharing is turned off);
ViTs with LoRA on every block's ``qkv`` share nothing.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from persrep.config import content_key
from persrep.contrastive.train import ADAPTER
from persrep.models.backbones import Backbone, build_backbone, eval_transform
from persrep.models.blend import blend
from persrep.models.prefix import global_from_map, prefix_split, run_prefix, run_tail
from persrep.models.lora import (AdapterFormatError, identity_mismatches, load_adapter, scale_lora,
                                 lora_state_dict, read_adapter_metadata)

__all__ = ["ModelSpec", "extractor_key", "Extractors", "device"]


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class ModelSpec:
    """One model of a scan: ``name`` = "pretrained" or the instance whose adapter it is."""

    name: str
    adapter_key: str | None  # None: the pretrained backbone

    @property
    def kind(self) -> str:
        return "pretrained" if self.adapter_key is None else "personalised"


def extractor_key(source, spec: ModelSpec) -> str:
    """Names everything that determines an embedding except the image: backbone, adapter, feature."""
    scale, share, size = adapter_scale(source), pretrained_share(source), global_input_size(source)
    return content_key("find-embedding", source.backbone, source.global_feature,
                       spec.adapter_key or "pretrained", *([scale] if spec.adapter_key and scale != 1.0 else []),
                       *([("pretrained_share", share)] if spec.adapter_key and share > 0 else []),
                       *([("global_input_size", size)] if size else []))


def global_input_size(source) -> int | None:
    """The run's ``evaluation.global_input_size``: find embeds photos at the size the run evaluated."""
    return source.settings.evaluation.global_input_size


def adapter_scale(source) -> float:
    """The run's ``evaluation.adapter_scale``: find embeds with the adapters as the run evaluated them."""
    return float(source.settings.evaluation.adapter_scale)


def pretrained_share(source) -> float:
    """The run's ``evaluation.pretrained_share``: a personalised model's features are blended with
    the pretrained ones as the run evaluated them (persrep/models/blend.py)."""
    return float(source.settings.evaluation.pretrained_share)


class Extractors:
    """Global (and dense) features of image batches for every model of a scan."""

    def __init__(self, source, specs: list[ModelSpec], share_trunk: bool = True):
        self.source, self.specs = source, list(specs)
        self.device = device()
        self.transform = eval_transform(source.backbone, size=global_input_size(source))
        self.backbone: Backbone = build_backbone(source.backbone).eval()
        self.states: dict[str, dict[str, torch.Tensor]] = {}
        adapters = [s for s in self.specs if s.adapter_key]
        if adapters:
            self._load_adapters(adapters)
        self.backbone.to(self.device).eval()
        self._current: str | None = None
        self.split = self._trunk_split() if share_trunk and adapters else None
        if self.split is not None and not self._sharing_is_exact():
            self.split = None

    # -- loading --------------------------------------------------------------------------
    def _load_adapters(self, adapters: list[ModelSpec]) -> None:
        st = self.source.storage
        with tempfile.TemporaryDirectory(prefix="persrep-find-") as tmp:
            metas = {}
            for spec in adapters:
                path = Path(tmp) / f"{spec.adapter_key}.safetensors"
                path.write_bytes(st.read_unit_file("adapters", spec.adapter_key, ADAPTER))
                metas[spec.name] = (path, read_adapter_metadata(path))
            first = adapters[0]
            load_adapter(self.backbone, metas[first.name][0])  # checks the base identity, injects LoRA
            lora = metas[first.name][1]["lora"]
            for spec in adapters:
                path, meta = metas[spec.name]
                problems = identity_mismatches(meta["base_identity"], self.backbone.identity)
                if problems or meta["lora"] != lora:
                    raise AdapterFormatError(
                        f"adapter {spec.adapter_key} ({spec.name}) does not share the LoRA layout or "
                        f"base of adapter {first.adapter_key}: {'; '.join(problems) or 'lora differs'}")
                # scaled as the run evaluated them (evaluation.adapter_scale)
                self.states[spec.name] = scale_lora(load_file(str(path)), adapter_scale(self.source))
        zero = {k: (torch.zeros_like(v) if "lora_B" in k else v.clone())
                for k, v in lora_state_dict(self.backbone).items()}
        self.states["pretrained"] = zero

    def use(self, name: str) -> Backbone:
        """Swap in the LoRA tensors of model ``name`` (no-op without adapters)."""
        if self.states and self._current != name:
            set_peft_model_state_dict(self.backbone.model,
                                      {k: v.to(self.device) for k, v in self.states[name].items()})
            self._current = name
        return self.backbone

    # -- shared trunk -----------------------------------------------------------------------
    def _trunk_split(self) -> int | None:
        return prefix_split(self.backbone)  # persrep.models.prefix: the first adapted block

    def _trunk(self, x: torch.Tensor) -> torch.Tensor:
        return run_prefix(self.backbone, x, self.split)

    def _tail(self, h: torch.Tensor) -> torch.Tensor:
        return global_from_map(run_tail(self.backbone, h, self.split)[0], self.source.global_feature)

    def _sharing_is_exact(self) -> bool:
        x = torch.randn(2, 3, self.source.backbone.image_size, self.source.backbone.image_size,
                        generator=torch.Generator().manual_seed(0)).to(self.device)
        name = self.specs[-1].name
        with torch.inference_mode():
            plain = self.use(name).global_features(x, feature=self.source.global_feature)
            shared = self._tail(self._trunk(x))
        return float((plain - shared).abs().max()) <= 1e-4

    # -- features ---------------------------------------------------------------------------
    def global_features(self, images: torch.Tensor, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """``[N, 3, H, W]`` -> {model name: ``[N, D]`` float32}."""
        names = names if names is not None else [s.name for s in self.specs]
        x = images.to(self.device)
        share = pretrained_share(self.source)
        out: dict[str, np.ndarray] = {}
        with torch.inference_mode():
            trunk = self._trunk(x) if self.split is not None and names else None

            def features(name: str) -> torch.Tensor:
                self.use(name)
                return (self._tail(trunk) if trunk is not None else
                        self.backbone.global_features(x, feature=self.source.global_feature))

            # personalised features blended with the pretrained ones (evaluation.pretrained_share)
            pre = features("pretrained") if share > 0 and any(n != "pretrained" for n in names) else None
            for name in names:
                feats = pre if name == "pretrained" and pre is not None else features(name)
                if name != "pretrained" and pre is not None:
                    feats = blend(feats, pre, share)
                out[name] = feats.float().cpu().numpy()
        return out

    def dense_features(self, images: torch.Tensor, name: str) -> torch.Tensor:
        with torch.inference_mode():
            return self.use(name).dense_features(images.to(self.device)).float().cpu()
