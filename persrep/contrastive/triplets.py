"""Triplet sampling per the reference: (anchor, positive, negative), with replacement, seeded.

anchor   = one of the instance's real train images (uniform)
positive = one of ``num_positives`` synthetic positives (the pool is shuffled by the seed and
           cut to ``num_positives`` first, as the reference does); for ``real_only`` the
           positives *are* the real images, made different from the anchor by augmentation
negative = one of the negatives (uniform): generated category negatives, or an external pool

Unlike the reference we do not randomise a left/right order with a label: our loss takes the
positive and negative explicitly, so that shuffle would carry no information.
The same (pools, counts, seed) always give the same triplets.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")


class TripletError(ValueError):
    pass


def sample_triplets(anchors: Sequence[T], positives: Sequence[T], negatives: Sequence[T],
                    num_triplets: int, num_positives: int, seed: int) -> list[tuple[T, T, T]]:
    if not anchors:
        raise TripletError("no anchors: the instance has no real train images")
    if not negatives:
        raise TripletError("no negatives: generate category negatives (synthesis stage) or set "
                           "personalization.external_negatives to a folder of other objects")
    rng = np.random.default_rng([seed, 0x7121])
    pool = list(positives)
    if not pool:  # never silently real-only: the caller decides, and labels it (pipeline/stages/synthesis.py)
        raise TripletError("no positives: pass the real images as positives for real-only training")
    order = rng.permutation(len(pool))[:num_positives]
    pool = [pool[i] for i in order]
    if len(pool) < num_positives and positives:
        warnings.warn(f"{len(pool)} positives available, {num_positives} asked for", stacklevel=2)
    a = rng.integers(0, len(anchors), num_triplets)
    p = rng.integers(0, len(pool), num_triplets)
    n = rng.integers(0, len(negatives), num_triplets)
    return [(anchors[i], pool[j], negatives[k]) for i, j, k in zip(a, p, n)]
