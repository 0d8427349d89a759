"""What evaluation needs from a backbone, and the feature-space helpers every task shares.

The evaluation suite never imports a backbone: it talks to anything that satisfies
:class:`FeatureExtractor`. Which global feature (``cls`` or ``cls+mean``), which adapter and
which input size are the extractor's business; the caller names them in the extractor *key*
(see :mod:`persrep.evaluation.cache`) and in the result rows.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch

__all__ = [
    "FeatureExtractor",
    "check_global_output",
    "check_dense_output",
    "l2_normalize",
    "cosine_similarity_matrix",
    "WithGlobalFeature",
]


@runtime_checkable
class FeatureExtractor(Protocol):
    """A frozen (possibly personalised) backbone seen through two read-only views.

    Inputs are normalised image batches ``[N, 3, H, W]`` on the CPU; the extractor moves them
    to its own device. Outputs may live on any device; callers move them to the CPU.
    """

    def global_features(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` -> ``[N, D]`` one embedding per image (not necessarily normalised)."""
        ...

    def dense_features(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` -> ``[N, D, h, w]`` one feature per patch on the patch grid."""
        ...


class WithGlobalFeature:
    """A backbone whose ``global_features(x, feature=...)`` takes a mode, fixed to one mode.

    ``persrep.models.backbones.Backbone`` defaults to ``"cls"``; evaluating ``"cls+mean"``
    (the training feature) needs the mode bound explicitly, and named in the extractor key.
    """

    def __init__(self, backbone, feature: str, dense: str = "last"):
        self.backbone, self.feature, self.dense = backbone, feature, dense

    def global_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.global_features(images, feature=self.feature)

    def dense_features(self, images: torch.Tensor) -> torch.Tensor:
        if self.dense == "last":
            return self.backbone.dense_features(images)
        return self.backbone.dense_features(images, mode=self.dense)


def check_global_output(out: torch.Tensor, n_images: int) -> None:
    """Fail with a clear message when ``global_features`` broke its contract."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"global_features must return a torch.Tensor, got {type(out).__name__}")
    if out.ndim != 2 or out.shape[0] != n_images:
        raise ValueError(f"global_features returned shape {tuple(out.shape)} for {n_images} "
                         "images; expected [N, D]")


def check_dense_output(out: torch.Tensor, n_images: int) -> None:
    """Fail with a clear message when ``dense_features`` broke its contract."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"dense_features must return a torch.Tensor, got {type(out).__name__}")
    if out.ndim != 4 or out.shape[0] != n_images:
        raise ValueError(f"dense_features returned shape {tuple(out.shape)} for {n_images} "
                         "images; expected [N, D, h, w]")


def l2_normalize(x: np.ndarray, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
    """Unit-length vectors along ``axis``; all-zero vectors stay zero (cosine 0 to everything)."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norm, eps)


def cosine_similarity_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[N, D]`` x ``[M, D]`` -> ``[N, M]`` cosine similarities."""
    a = np.asarray(a)
    b = np.asarray(b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"cosine similarity needs [N, D] and [M, D] with equal D; got "
                         f"{a.shape} and {b.shape}")
    return l2_normalize(a) @ l2_normalize(b).T
