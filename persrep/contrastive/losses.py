"""InfoNCE with the reference's batch semantics, and a symmetric variant.

Reference semantics (released code, ``info_nce_fixed``), for a batch of B triplets with
L2-normalised anchor q_i, positive p_j and negative n_k embeddings and temperature t:

    loss = mean over i, j of  -log( exp(q_i.p_j / t) / (exp(q_i.p_j / t) + sum_k exp(q_i.n_k / t)) )

i.e. every anchor is pulled toward *every* positive in the batch (all positives show the same
instance), each (anchor, positive) pair is contrasted against *all* of the batch's negatives, and
the other positives do not appear in the denominator. Computed here in one vectorised step
instead of the reference's Python loop over positives (same value; checked in float64).

Symmetric variant (ours): the mean of the loss above and the same loss with the roles of anchors
and positives swapped (positives as queries, anchors as keys, the same negatives).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def info_nce(query: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
             temperature: float = 0.07) -> torch.Tensor:
    """Reference InfoNCE: [B,D] queries, [P,D] positives, [K,D] negatives -> scalar."""
    if query.ndim != 2 or positives.ndim != 2 or negatives.ndim != 2:
        raise ValueError("info_nce expects 2-D [batch, dim] tensors")
    q = F.normalize(query, dim=1)
    pos = (q @ F.normalize(positives, dim=1).T) / temperature        # [B, P]
    neg = (q @ F.normalize(negatives, dim=1).T) / temperature        # [B, K]
    neg_lse = torch.logsumexp(neg, dim=1, keepdim=True)               # [B, 1]
    # log(exp(pos) + sum exp(neg)) for each (i, j) without materialising [B, P, K]
    denom = torch.logaddexp(pos, neg_lse.expand_as(pos))
    return (denom - pos).mean()


class InfoNCELoss(nn.Module):
    def __init__(self, temperature: float = 0.07, symmetric: bool = False):
        super().__init__()
        self.temperature = temperature
        self.symmetric = symmetric

    def forward(self, anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        loss = info_nce(anchors, positives, negatives, self.temperature)
        if self.symmetric:
            loss = 0.5 * (loss + info_nce(positives, anchors, negatives, self.temperature))
        return loss


def build_loss(name: str, temperature: float) -> InfoNCELoss:
    if name == "infonce":
        return InfoNCELoss(temperature)
    if name == "infonce_symmetric":
        return InfoNCELoss(temperature, symmetric=True)
    raise ValueError(f"personalization.loss={name!r}: choose infonce or infonce_symmetric")


@torch.no_grad()
def triplet_accuracy(anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor) -> float:
    """Share of triplets whose anchor is closer (cosine) to its positive than to its negative."""
    cos = F.cosine_similarity
    return (cos(anchors, positives) > cos(anchors, negatives)).float().mean().item()
