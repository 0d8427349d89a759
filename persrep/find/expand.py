"""Query expansion from the collection itself: an object's hits join its reference photos.

Three reference photos are a thin description of an object; the collection being searched
usually holds more photos of it, and the ones the rule already calls hits are mostly right.
So the find decides twice: after the first decision (:mod:`persrep.find.calibrate`), each
object's best hits (at most ``k``, highest score first) are added to its reference photos, every
photo is scored again against the expanded references under every model (max cosine, as
before), and the rule decides again on the new scores. A photo that looks like those hits, but
less like the three originals (another angle, other light, another shop), now scores high.

This is average-query-expansion's idea from instance retrieval (Chum et al., ICCV 2007), in the
max-cosine form the scan already uses, gated by the calibrated rule instead of a fixed top-k (a
photo is added only if it is already a hit: it wins the competition and stands out of the
collection's background). It uses only what a user has: the run's reference photos and the
unlabelled collection, never a label. The same photos join the object's references under every
model, so the rivals are expanded too: a photo taken into another object's set scores 1.0 for
that object and cannot be a hit of this one.

Pure numpy over embeddings the scan has already stored (persrep/find/store.py): nothing is
embedded again. Measured on the dev collection: bench/find.json (entries ``*_expand*``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = ["DEFAULT_EXPAND", "EXPAND_RULE", "expansion_sets", "expanded_references"]

DEFAULT_EXPAND = 10  # hits added per object (bench/find.json: 0, 5, 10, 20 measured)
EXPAND_RULE = ("; then each object's best hits (at most {k}) join its reference photos, every photo is "
               "scored again against the expanded references and the rule decides again")


def expansion_sets(score: np.ndarray, hit: np.ndarray, k: int) -> np.ndarray:
    """Rows of the ``k`` best hits (by ``score``, best first; ties by row) of one object."""
    if k < 0:
        raise ValueError(f"expand: {k} photos per object; give 0 (off) or more")
    rows = np.flatnonzero(np.asarray(hit, dtype=bool))
    s = np.asarray(score, dtype=np.float64)[rows]
    return rows[np.lexsort((rows, -s))][:k]


def expanded_references(emb: np.ndarray, ref: np.ndarray, owners: list[str],
                        sets: Mapping[str, np.ndarray]) -> tuple[np.ndarray, list[str]]:
    """``ref`` and ``owners`` (one model's reference embeddings and the object of each row) with
    each object's expansion photos added: rows ``sets[object]`` of ``emb`` (the collection's
    embeddings under the same model). Objects without a set keep their references."""
    unknown = sorted(set(sets) - set(owners))
    if unknown:
        raise ValueError(f"expansion sets for objects without reference photos: {unknown}")
    rows, new_owners = [ref], list(owners)
    for name in dict.fromkeys(owners):
        take = np.asarray(sets.get(name, []), dtype=np.int64)
        if len(take):
            rows.append(np.asarray(emb[take], dtype=ref.dtype))
            new_owners += [name] * len(take)
    return np.concatenate(rows), new_owners
