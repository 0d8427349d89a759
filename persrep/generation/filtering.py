"""Filter generated positives by perceptual similarity to the instance's real photos.

As in the reference ("Filtering" in ../shared/docs/REFERENCE.md, not in this repository): each
generated image is cropped to its object's mask box (when the generator emits a mask; else the whole
image is used), compared with the real photos (each cropped to its own mask box when masks exist),
and kept if its similarity is >= the threshold. :func:`filter_until` redraws a rejected image with
new seeds until it passes or its attempts run out, and records every attempt with its score so the
threshold can be studied.

Scorers (``synthesis.filter.scorer``), higher = more similar:

- ``embedding``: mean cosine similarity of embeddings (the DreamSim recipe with any feature
  function). Default features: the real offline ImageNet EfficientNet-Lite0
  (:mod:`persrep.models.backbones`, ``weights=offline``), the only real weights on CPU machines.
- ``lpips``: ``1 - mean LPIPS distance`` (lpips package). Its AlexNet/VGG backbone comes from the
  torch hub cache; offline without it the scorer fails with one line saying what to provide.
  ``random_backbone=True`` (lpips ``pnet_rand``) runs anywhere but measures little: tests only.
- ``dreamsim``: DreamSim embeddings, when the ``dreamsim`` package and its weights are present.
"""

from __future__ import annotations

import math
import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from persrep.compositing import mask_box_crop
from persrep.generation.base import InstanceData, SampledImage, SampleRow
from persrep.hashing import stable_seed
from persrep.models.errors import ModelError

FeatureFn = Callable[[list[Image.Image]], torch.Tensor]  # images -> [N, D] embeddings
LPIPS_BACKBONE_URLS = {  # what lpips' torchvision backbones download into <torch hub>/checkpoints
    "alex": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    "vgg": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "squeeze": "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth",
}
_SCORERS: dict[str, type["SimilarityScorer"]] = {}


class ScorerUnavailableError(ModelError):
    """A scorer's package or weights are missing; the one-line message says what to provide."""


# ---------------------------------------------------------------------------------------------
# scorers
def register_scorer(cls: type["SimilarityScorer"]) -> type["SimilarityScorer"]:
    _SCORERS[cls.name] = cls
    return cls


def scorer_names() -> list[str]:
    return sorted(_SCORERS)


def make_scorer(name: str, instance: InstanceData, **options: Any) -> "SimilarityScorer":
    """The scorer ``name`` with ``instance``'s photos (and masks) as the references."""
    if name not in _SCORERS:
        raise ValueError(f"unknown filter scorer {name!r}: choose one of {scorer_names()} "
                         "(synthesis.filter.scorer)")
    return _SCORERS[name](instance.train_images, instance.train_masks, **options)


class SimilarityScorer(ABC):
    """Similarity of generated images to fixed real references (mask-box crops of both)."""

    name: ClassVar[str]

    def __init__(self, reference_images: list[Image.Image], reference_masks: list[Image.Image] | None = None):
        if not reference_images:
            raise ValueError(f"{self.name} scorer: no reference images (the instance's real photos)")
        masks = reference_masks if reference_masks is not None else [None] * len(reference_images)
        if len(masks) != len(reference_images):
            raise ValueError(f"{self.name} scorer: {len(reference_images)} reference images but "
                             f"{len(masks)} masks; give one mask per image, or none")
        self.references = [mask_box_crop(i, m) for i, m in zip(reference_images, masks)]

    @abstractmethod
    def score_crops(self, crops: list[Image.Image]) -> list[float]:
        """Similarity of each (already cropped) image to the references, higher = more similar."""

    def score(self, images: list[Image.Image], masks: list[Image.Image | None] | None = None) -> list[float]:
        masks = masks if masks is not None else [None] * len(images)
        return self.score_crops([mask_box_crop(i, m) for i, m in zip(images, masks)]) if images else []

    def __call__(self, samples: list[SampledImage]) -> list[float]:
        return self.score([s.image for s in samples], [s.mask for s in samples])


@register_scorer
class EmbeddingScorer(SimilarityScorer):
    """Mean cosine similarity between embeddings of the image and of each reference.

    ``feature_fn(images) -> [N, D]``; default: the offline EfficientNet-Lite0 at ``image_size``.
    """

    name = "embedding"

    def __init__(self, reference_images: list[Image.Image], reference_masks: list[Image.Image] | None = None,
                 *, feature_fn: FeatureFn | None = None, image_size: int = 224, device: Any = None):
        super().__init__(reference_images, reference_masks)
        self.feature_fn = feature_fn or offline_backbone_features(image_size, _device(device))
        self._reference_embeddings = self._embed(self.references)

    def _embed(self, images: list[Image.Image]) -> torch.Tensor:
        with torch.no_grad():
            feats = self.feature_fn(images)
        return F.normalize(feats.detach().float().cpu().flatten(1), dim=1)

    def score_crops(self, crops: list[Image.Image]) -> list[float]:
        similarity = self._embed(crops) @ self._reference_embeddings.T
        return similarity.mean(dim=1).tolist()


@register_scorer
class LpipsScorer(SimilarityScorer):
    """``1 - mean LPIPS distance`` to the references, on crops resized to ``size`` x ``size``."""

    name = "lpips"

    def __init__(self, reference_images: list[Image.Image], reference_masks: list[Image.Image] | None = None,
                 *, net: str = "alex", random_backbone: bool = False, size: int = 224,
                 device: Any = None, batch_size: int = 32):
        super().__init__(reference_images, reference_masks)
        self.size, self.batch_size, self.device = size, batch_size, _device(device)
        self.model = load_lpips(net, random_backbone).to(self.device)
        self._references = self._tensor(self.references)

    def _tensor(self, images: list[Image.Image]) -> torch.Tensor:
        arrays = [np.asarray(i.resize((self.size, self.size), Image.Resampling.BILINEAR), dtype=np.float32)
                  for i in images]
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        return (batch / 127.5 - 1.0).to(self.device)  # lpips expects [-1, 1]

    def score_crops(self, crops: list[Image.Image]) -> list[float]:
        images, refs = self._tensor(crops), self._references
        n, r = len(images), len(refs)
        left, right = images.repeat_interleave(r, dim=0), refs.repeat(n, 1, 1, 1)  # every pair
        with torch.no_grad():
            dist = torch.cat([self.model(left[i:i + self.batch_size], right[i:i + self.batch_size]).flatten()
                              for i in range(0, n * r, self.batch_size)])
        return (1.0 - dist.view(n, r).mean(dim=1)).cpu().tolist()


@register_scorer
class DreamSimScorer(EmbeddingScorer):
    """DreamSim embeddings (the reference's filter), when the package and weights are present."""

    name = "dreamsim"

    def __init__(self, reference_images: list[Image.Image], reference_masks: list[Image.Image] | None = None,
                 *, cache_dir: str | None = None, device: Any = None):
        super().__init__(reference_images, reference_masks,
                         feature_fn=dreamsim_features(cache_dir, _device(device)))


def scorer_from_settings(filter_settings: Any, instance: InstanceData, **options: Any) -> SimilarityScorer:
    """The scorer named by ``synthesis.filter.scorer`` for ``instance``."""
    return make_scorer(filter_settings.scorer, instance, **options)


# ---------------------------------------------------------------------------------------------
# feature functions and model loading
def _device(device: Any) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@lru_cache(maxsize=4)
def offline_backbone_features(image_size: int = 224, device: torch.device | None = None) -> FeatureFn:
    """Average-pooled features of the real offline EfficientNet-Lite0 (built once per process).

    Crops are resized whole to ``image_size`` squared (no centre crop: it would cut the object)."""
    from persrep.config import BackboneSettings
    from persrep.models.backbones import build_backbone, eval_transform

    settings = BackboneSettings(name="tf_efficientnet_lite0", weights="offline", image_size=image_size)
    device = device or _device(None)
    model = build_backbone(settings).to(device)
    transform = eval_transform(settings, center_crop=False)

    def features(images: list[Image.Image]) -> torch.Tensor:
        batch = torch.stack([transform(i) for i in images]).to(device)
        return model.global_features(batch, "cls")

    return features


def load_lpips(net: str = "alex", random_backbone: bool = False) -> torch.nn.Module:
    """An eval-mode lpips model. ``random_backbone``: seeded random backbone, no download (tests)."""
    if net not in LPIPS_BACKBONE_URLS:
        raise ValueError(f"lpips net {net!r}: choose one of {sorted(LPIPS_BACKBONE_URLS)}")
    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecated `pretrained=` inside lpips
        if random_backbone:
            with torch.random.fork_rng(devices=[]):  # same random backbone in every process
                torch.manual_seed(0)
                return lpips.LPIPS(net=net, pnet_rand=True, verbose=False).eval()
        try:
            return lpips.LPIPS(net=net, verbose=False).eval()
        except (OSError, RuntimeError) as exc:  # URLError is an OSError; bad file: RuntimeError
            raise _lpips_unavailable(net, exc) from None


def _lpips_unavailable(net: str, exc: Exception) -> ScorerUnavailableError:
    file = LPIPS_BACKBONE_URLS[net].rsplit("/", 1)[1]
    where = Path(torch.hub.get_dir()) / "checkpoints" / file
    problem = "is unreadable" if where.exists() else "is missing and cannot be downloaded"
    reason = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
    return ScorerUnavailableError(
        f"synthesis.filter.scorer=lpips: the {net} backbone weights {where} {problem} ({type(exc).__name__}: {reason}); "
        f"copy {file} into {where.parent} (set $TORCH_HOME to choose the cache), "
        "or use synthesis.filter.scorer=embedding (offline EfficientNet-Lite0)")


# what dreamsim(pretrained=True) (its default "ensemble" model) reads from its cache directory
DREAMSIM_FILES = ("dino_vitb16_pretrain.pth", "open_clip_vitb16_pretrain.pth.tar",
                  "clip_vitb16_pretrain.pth.tar", "ensemble_lora")


def dreamsim_cache_dir(cache_dir: str | None = None) -> Path:
    """Where DreamSim's weights are read: ``cache_dir``, ``$DREAMSIM_CACHE``, or ``<torch hub>/dreamsim``."""
    return Path(cache_dir or os.environ.get("DREAMSIM_CACHE") or Path(torch.hub.get_dir()) / "dreamsim")


def require_scorer(filter_settings: Any, cache_dir: str | None = None) -> None:
    """Before compute: the scorer named by ``synthesis.filter.scorer`` can run here, offline.

    ``dreamsim`` is an optional extra (``pip install persrep[dreamsim]``) whose weights are a
    download; both are checked now, so a missing one fails in one line instead of inside every
    synthesis unit. ``embedding`` is the offline scorer; ``lpips`` needs torchvision's AlexNet
    weights in the torch hub cache, or a network to fetch them (checked now too)."""
    if not filter_settings.enabled:
        return
    if filter_settings.scorer == "lpips":
        require_lpips_weights("alex")
        return
    if filter_settings.scorer != "dreamsim":
        return
    import importlib.util

    cache = dreamsim_cache_dir(cache_dir)
    offline = "or use the offline scorer synthesis.filter.scorer=embedding"
    if importlib.util.find_spec("dreamsim") is None:
        raise ScorerUnavailableError(
            "synthesis.filter.scorer=dreamsim: the dreamsim package is not installed: "
            f"`pip install persrep[dreamsim]` and unpack its weights into {cache} ($DREAMSIM_CACHE), {offline}")
    missing = [f for f in DREAMSIM_FILES if not (cache / f).exists()]
    if missing:
        raise ScorerUnavailableError(
            f"synthesis.filter.scorer=dreamsim: its weights are not in {cache} (missing {', '.join(missing)}): "
            "on a machine with network run `python -c \"from dreamsim import dreamsim; dreamsim(cache_dir='DIR')\"`, "
            f"copy DIR here and set $DREAMSIM_CACHE to it, {offline}")


def require_lpips_weights(net: str = "alex", timeout_s: float = 3.0) -> None:
    """lpips' backbone weights are in the torch hub cache, or their download host answers."""
    import socket
    from urllib.parse import urlparse

    url = LPIPS_BACKBONE_URLS[net]
    if (Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]).is_file():
        return
    host = urlparse(url).hostname or ""
    try:
        with socket.create_connection((host, 443), timeout=timeout_s):
            return
    except OSError as exc:
        raise _lpips_unavailable(net, exc) from None


def dreamsim_features(cache_dir: str | None = None, device: torch.device | None = None) -> FeatureFn:
    """DreamSim embeddings; weights from ``cache_dir`` (default :func:`dreamsim_cache_dir`)."""
    cache = dreamsim_cache_dir(cache_dir)
    try:
        from dreamsim import dreamsim
    except ImportError:
        raise ScorerUnavailableError(
            "dreamsim scorer: the dreamsim package is not installed: `pip install dreamsim` and put "
            f"its weights in {cache}, or use synthesis.filter.scorer=embedding") from None
    device = device or _device(None)
    try:
        os.makedirs(cache, exist_ok=True)
        model, preprocess = dreamsim(pretrained=True, device=str(device), cache_dir=str(cache))
    except Exception as exc:  # noqa: BLE001 - download/unzip/load errors of many types: one line
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
        raise ScorerUnavailableError(
            f"dreamsim scorer: its weights could not be loaded from {cache} ({type(exc).__name__}: "
            f"{reason}); unpack the DreamSim checkpoint there (cache_dir), or use "
            "synthesis.filter.scorer=embedding") from None

    def features(images: list[Image.Image]) -> torch.Tensor:
        return model.embed(torch.cat([preprocess(i) for i in images]).to(device))

    return features


# ---------------------------------------------------------------------------------------------
# generate, score, retry
@dataclass
class ScoredAttempt:
    """One generated candidate: the row that regenerates it alone, its score, and the verdict."""

    target: int  # index of the requested row this attempt stands for
    attempt: int  # 0 = the row's own seed, then 1, 2, ...
    row: SampleRow  # the requested row with this attempt's seed
    score: float
    kept: bool
    sample: SampledImage | None = None  # pixels: always for kept attempts, for rejected on request

    def record(self) -> dict[str, Any]:
        return {"instance": self.row.instance, "generator": self.row.generator, "index": self.row.index,
                "target": self.target, "attempt": self.attempt, "seed": self.row.seed,
                "score": self.score, "kept": self.kept}


@dataclass
class FilterResult:
    threshold: float
    attempts: list[ScoredAttempt] = field(default_factory=list)  # every attempt, in generation order

    @property
    def kept(self) -> list[ScoredAttempt]:
        """The accepted attempt of each target that got one, in target order."""
        return sorted((a for a in self.attempts if a.kept), key=lambda a: a.target)

    @property
    def kept_samples(self) -> list[SampledImage]:
        return [a.sample for a in self.kept if a.sample is not None]

    def exhausted(self, n_targets: int) -> list[int]:
        """Targets whose attempts all scored below the threshold."""
        done = {a.target for a in self.attempts if a.kept}
        return [t for t in range(n_targets) if t not in done]

    @property
    def acceptance_rate(self) -> float:
        return sum(a.kept for a in self.attempts) / len(self.attempts) if self.attempts else 0.0


def attempt_seed(seed: int, attempt: int) -> int:
    """Attempt 0 keeps the row's seed (so filtering on or off shares the first image); retries
    derive new seeds from it, so a row's whole retry sequence is reproducible alone."""
    return seed if attempt == 0 else stable_seed(seed, attempt)


def filter_until(generate_fn: Callable[[list[SampleRow]], list[SampledImage]],
                 scorer: Callable[[list[SampledImage]], list[float]], rows: list[SampleRow],
                 threshold: float, max_attempts_per_image: int,
                 keep_rejected_images: bool = False) -> FilterResult:
    """Generate ``rows`` and redraw each rejected one until it scores >= ``threshold``.

    One kept image is wanted per row (``len(rows)`` in all). Each row is retried on its own, at
    most ``max_attempts_per_image`` times, with seeds :func:`attempt_seed` ``(row.seed, attempt)``;
    retries of all still-rejected rows are generated together in one call per round. A row's
    outcome therefore depends on that row alone, whatever batch it came in. Returns every attempt,
    kept or not, with its score (NaN scores count as rejected). Rejected attempts keep their
    pixels only with ``keep_rejected_images`` (450 rows x 10 attempts would not fit in memory).
    """
    if max_attempts_per_image < 1:
        raise ValueError(f"max_attempts_per_image={max_attempts_per_image}: need at least 1 "
                         "(synthesis.filter.max_attempts_per_image)")
    result = FilterResult(threshold)
    pending = list(range(len(rows)))
    for attempt in range(max_attempts_per_image):
        if not pending:
            break
        batch = [replace(rows[t], seed=attempt_seed(rows[t].seed, attempt)) for t in pending]
        samples = generate_fn(batch)
        scores = scorer(samples) if samples else []
        if len(samples) != len(batch) or len(scores) != len(batch):
            raise ValueError(f"filter: asked for {len(batch)} images, got {len(samples)} images and "
                             f"{len(scores)} scores: generate_fn and scorer must return one per row")
        still_pending = []
        for target, row, sample, score in zip(pending, batch, samples, scores):
            score = float(score)
            kept = math.isfinite(score) and score >= threshold
            keep_pixels = kept or keep_rejected_images
            result.attempts.append(ScoredAttempt(target, attempt, row, score, kept,
                                                 sample if keep_pixels else None))
            if not kept:
                still_pending.append(target)
        pending = still_pending
    return result
