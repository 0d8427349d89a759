"""Which photos hold which instance: two tiers of hits, from the collection's own scores.

Calibration uses only what a user has: the run (its models and every instance's reference
photos) and the *unlabelled* collection being searched. Per photo ``x``, instance ``c`` and the
model deciding for ``c`` (its adapter, or the pretrained backbone), the scan gives

- ``score`` ``s_c(x)``: max cosine of ``x`` to ``c``'s reference photos;
- ``rival`` ``r_c(x)``: max cosine of ``x`` to the reference photos of every *other* instance of
  the run's data set, under the same model: real photos of other objects, the best competitor.

The rule (documented in the README, checked in tests/test_find.py):

1. **Background.** Most photos of a collection are not ``c``. The bulk of ``s_c`` over the
   collection is fitted robustly (median and 1.4826 x MAD, which a small share of positives
   does not move): ``z_c(x) = (s_c(x) - median) / scale``. A photo of ``c`` stands out of it.
2. **Competition.** ``x`` can be ``c`` only if ``c`` wins: ``margin = s_c(x) - r_c(x) > 0``. A
   photo of a sibling (another apple) is closer to the sibling's own photos. The margin is
   measured in the same robust units: ``m_c(x) = margin / scale``.
3. **Tiers.** A *hit*: wins and ``z >= POSSIBLE_Z``. With a personalised model, the pretrained
   backbone decides too (same rule, its own scores and rivals): a hit both models agree on with
   ``z >= AGREE_Z`` is *likely*, any other hit *possible* (measured on the dev collection:
   agreement raises precision far more than it costs recall). Searching with the pretrained
   backbone alone, *likely* needs ``z >= LIKELY_Z`` and ``m >= LIKELY_M``. The constants were
   chosen once on the dev collection (bench/find.py reports each tier's measured precision); per
   instance everything else comes from the collection's own scores, never from labels.
4. **Guard.** An instance that would be a hit in more than ``guard`` of the photos (default
   20 %) is flagged, with the reason. "Would be a hit" counts every photo where it wins the
   competition (the background test in step 1 always keeps only a tail, so it alone cannot
   show the problem), or, without rivals, every hit: a share that high is not one object among
   many. Either most photos really show it (then the background fit is wrong and the counts are
   too low) or its model collapsed (every photo looks like it).

Then (``--expand``, :mod:`persrep.find.expand`) each instance's best hits join its reference
photos, the photos are scored again and this rule decides again on the new scores.

:func:`decide` is pure numpy over the score columns, so a variant is tried on a stored
``scores.parquet`` without scanning again (bench/find.py ``--rescore``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["LIKELY_Z", "LIKELY_M", "AGREE_Z", "POSSIBLE_Z", "GUARD_SHARE", "Background", "InstanceDecision",
           "background", "decide", "decide_pairs"]

LIKELY_Z = 2.0  # pretrained alone: likely at z >= 2 and margin >= 0.5 scale
LIKELY_M = 0.5
AGREE_Z = 1.5  # personalised: likely when the pretrained model agrees and z >= 1.5
POSSIBLE_Z = 1.0
GUARD_SHARE = 0.20
MAD_TO_SIGMA = 1.4826
RULE = (f"a hit is closer to the object's reference photos than to any other object's (score > rival) "
        f"and stands out of the collection's background (robust z = (score - median) / 1.4826 MAD "
        f">= {POSSIBLE_Z:g}); likely when the personalised and the pretrained model both call it a hit "
        f"and z >= {AGREE_Z:g}, "
        f"possible when only the personalised one does (pretrained alone: likely at z >= {LIKELY_Z:g} "
        f"and margin >= {LIKELY_M:g} scale)")


@dataclass(frozen=True)
class Background:
    median: float
    scale: float

    def z(self, s: np.ndarray) -> np.ndarray:
        return (np.asarray(s, dtype=np.float64) - self.median) / self.scale


def background(scores: np.ndarray) -> Background:
    """Robust location and scale of one instance's scores over the collection."""
    s = np.asarray(scores, dtype=np.float64)
    s = s[np.isfinite(s)]
    if len(s) == 0:
        return Background(0.0, 1.0)
    med = float(np.median(s))
    scale = MAD_TO_SIGMA * float(np.median(np.abs(s - med)))
    if scale <= 1e-6:  # more than half the photos tie: fall back to the standard deviation
        scale = float(s.std())
    return Background(med, max(scale, 1e-6))


@dataclass
class InstanceDecision:
    """One instance's decisions over the collection (arrays aligned with the score column)."""

    tier: np.ndarray  # "likely", "possible" or ""
    z: np.ndarray
    margin: np.ndarray  # (score - rival) / scale
    background: Background
    likely_threshold: float  # the score where z reaches LIKELY_Z (and it must also win)
    possible_threshold: float
    likely: int
    possible: int
    share: float  # (likely + possible) / photos
    wins: float  # share of the photos where it beats every rival
    flag: str | None  # the guard's reason, or None

    def summary(self) -> dict:
        return {"likely": self.likely, "possible": self.possible, "share": round(self.share, 4),
                "wins": round(self.wins, 4),
                "likely_threshold": self.likely_threshold, "possible_threshold": self.possible_threshold,
                "background": asdict(self.background), "flag": self.flag}


def decide_pairs(score: np.ndarray, rival: np.ndarray, pairs: list[tuple[str, str]], *,
                 guard: float = GUARD_SHARE, **rule) -> dict[int, InstanceDecision]:
    """:func:`decide` for every column (``pairs[j] = (model, instance)``; model "pretrained" or the
    instance whose adapter it is): pretrained columns first, then each personalised column with
    the pretrained decision of its instance (when scanned) as ``support``."""
    out: dict[int, InstanceDecision] = {}
    pre = {inst: j for j, (m, inst) in enumerate(pairs) if m == "pretrained"}
    for j in pre.values():
        out[j] = decide(score[:, j], rival[:, j], guard=guard, **rule)
    for j, (m, inst) in enumerate(pairs):
        if m != "pretrained":
            sup = out[pre[inst]].tier != "" if inst in pre else None
            out[j] = decide(score[:, j], rival[:, j], guard=guard, support=sup, **rule)
    return out


def decide(score: np.ndarray, rival: np.ndarray, *, guard: float = GUARD_SHARE,
           likely_z: float = LIKELY_Z, likely_m: float = LIKELY_M,
           possible_z: float = POSSIBLE_Z, agree_z: float = AGREE_Z,
           support: np.ndarray | None = None) -> InstanceDecision:
    """Tiers of one instance from its score and rival columns over the collection (NaN = unreadable).

    ``support``: a second model's hits for the same instance (boolean, aligned): when given, a
    hit it shares with ``z >= agree_z`` is *likely*, any other hit *possible* (instead of the
    z / margin test)."""
    s = np.asarray(score, dtype=np.float64)
    r = np.asarray(rival, dtype=np.float64)
    ok = np.isfinite(s)
    bg = background(s[ok])
    z = bg.z(s)
    margin = (s - r) / bg.scale
    wins = ok & (margin > 0)
    if support is None:
        likely = wins & (z >= likely_z) & (margin >= likely_m)
        possible = wins & (z >= possible_z) & ~likely
    else:
        hit = wins & (z >= possible_z)
        likely = hit & np.asarray(support, dtype=bool) & (z >= agree_z)
        possible = hit & ~likely
    tier = np.where(likely, "likely", np.where(possible, "possible", ""))
    n = max(1, int(ok.sum()))
    share = float((likely | possible).sum()) / n
    has_rivals = bool(np.isfinite(r[ok]).any() and (r[ok] > -1).any())
    win_share = float(wins.sum()) / n
    would = max(share, win_share) if has_rivals else share
    flag = None
    if would > guard:
        flag = (f"closer to its own reference photos than to any other object's in {100 * would:.0f} % of "
                f"the photos (more than {100 * guard:.0f} %): either most photos show it (then the counts "
                "are too low) or its model sees every photo as this object (its counts are unreliable)")
    return InstanceDecision(tier, z, margin, bg, bg.median + likely_z * bg.scale,
                            bg.median + possible_z * bg.scale, int(likely.sum()), int(possible.sum()),
                            share, win_share, flag)
