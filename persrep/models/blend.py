"""A personalised global feature blended with the pretrained one (``evaluation.pretrained_share``).

Output-space WiSE-FT: with ``a`` the adapted and ``p`` the pretrained global feature of an image,
each L2-normalised, the blended feature is

    f = [sqrt(1 - s) * a, sqrt(s) * p]        (unit norm)

so that for two images ``cos(f1, f2) = (1 - s) * cos(a1, a2) + s * cos(p1, p2)``: every score a
task computes from cosines (classification's max cosine to the train photos, retrieval's ranking,
``persrep find``'s scores) becomes the share-weighted mix of the adapted and the pretrained
score. ``s = 0`` is the adapter alone (the feature is ``a`` itself, nothing appended); ``s = 1``
is the pretrained model. Unlike ``evaluation.adapter_scale`` (which scales the LoRA weights), the
pretrained score is kept exactly, so an adapter can add to it but never replace it: the point is
to bound the loss on an instance whose adapter learnt the wrong cue (bench/realphoto.json).
Dense tasks keep the adapter's own dense features.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from persrep.models.lora import check_fraction


def check_share(share: float) -> None:
    check_fraction(share, "pretrained share")


def blend(adapted: torch.Tensor, pretrained: torch.Tensor, share: float) -> torch.Tensor:
    """``[N, D]`` + ``[N, D']`` -> ``[N, D + D']``: the blended global features (see module doc)."""
    check_share(share)
    if adapted.shape[0] != pretrained.shape[0]:
        raise ValueError(f"{adapted.shape[0]} adapted features for {pretrained.shape[0]} pretrained ones")
    a = torch.nn.functional.normalize(adapted.float(), dim=1)
    if share == 0.0:
        return a
    p = torch.nn.functional.normalize(pretrained.float(), dim=1)
    return torch.cat([math.sqrt(1.0 - share) * a, math.sqrt(share) * p], dim=1)


def blend_arrays(adapted: np.ndarray, pretrained: np.ndarray, share: float) -> np.ndarray:
    """:func:`blend` on numpy arrays (float32 out)."""
    return blend(torch.from_numpy(np.asarray(adapted)), torch.from_numpy(np.asarray(pretrained)),
                 share).numpy().astype(np.float32)


class BlendedExtractor:
    """A feature extractor (``global_features`` / ``dense_features``) whose global features are
    ``adapted``'s blended with ``pretrained``'s; both take the same inputs (images, or the same
    prefix activations). Dense features are ``adapted``'s."""

    def __init__(self, adapted, pretrained, share: float):
        check_share(share)
        self.adapted, self.pretrained, self.share = adapted, pretrained, share

    def global_features(self, x: torch.Tensor) -> torch.Tensor:
        return blend(self.adapted.global_features(x), self.pretrained.global_features(x), self.share)

    def dense_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapted.dense_features(x)
