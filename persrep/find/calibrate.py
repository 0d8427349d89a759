"""A yes/no answer per photo: each instance's threshold, from data the run already has.

The rule (documented in the README and checked in the tests):

- *Positives*: when the run synthesised them, the instance's **cut-and-paste positives** (its
  masked photos pasted on unrelated backgrounds, up to 64) scored against all its reference
  photos: stand-ins for photos in the wild. Otherwise the reference photos leave-one-out: each
  train photo scored against the other train photos (max cosine). Leave-one-out scores alone
  are too easy: reference photos are clean canonical views, far more alike than a photo in the
  wild (measured on the toy world: every test photo scored below the weakest leave-one-out
  score, recall 0), so they are only the fallback. Generated (DreamBooth) positives are not
  used: with an untrained generator they are noise.
- *Negatives*: the run's negatives pool (its external negatives folder, or the generated category
  negatives it synthesised), plus the reference photos of every *other* instance of the run's
  data set: what a user who personalised several objects owns anyway. Never the data set's test
  images: those are the evaluation pool, which ``bench/find.py`` scans as the labelled
  collection, so calibrating on them would leak (docs/PROTOCOL.md, leakage).
- *Threshold*: the value that maximises F1 of positives vs negatives; among all thresholds
  that reach that F1 (an interval between two consecutive calibration scores), the midpoint of
  the widest one. When the scores separate, that is the midpoint between the weakest positive
  and the strongest negative: a max-margin rule.

A photo is a *hit* for an instance when its score (max cosine to the instance's reference
photos under the model of the scan) is >= the threshold.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from persrep.data.layout import resolve_data_path
from persrep.evaluation.classification import instance_scores
from persrep.evaluation.features import cosine_similarity_matrix

__all__ = ["Calibration", "choose_threshold", "leave_one_out", "calibration_images", "calibrate"]

MAX_NEGATIVES = 256
MAX_SYNTHETIC = 64


@dataclass(frozen=True)
class Calibration:
    threshold: float
    f1: float
    positives: int
    negatives: int
    weakest_positive: float
    strongest_negative: float

    def as_dict(self) -> dict:
        return asdict(self)


def leave_one_out(train: np.ndarray) -> np.ndarray:
    """Each reference embedding's max cosine to the *other* reference embeddings (``[K]``)."""
    sims = cosine_similarity_matrix(train, train)
    np.fill_diagonal(sims, -np.inf)
    return sims.max(axis=1)


def choose_threshold(pos: np.ndarray, neg: np.ndarray) -> Calibration:
    """The F1-maximising threshold, the midpoint of the widest maximising interval."""
    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    if len(pos) == 0:
        raise ValueError("calibration needs at least one positive score")
    values = np.unique(np.concatenate([pos, neg]))
    # candidate intervals: (-inf, v0], (v0, v1], ..., each threshold in (lo, hi] decides alike
    lows = np.concatenate([[values[0] - 1.0], values])
    highs = np.concatenate([values, [values[-1] + 1.0]])
    best, best_width, best_t = -1.0, -1.0, float(values[0])
    for lo, hi in zip(lows, highs):
        t = hi  # any threshold in (lo, hi] gives the same decisions as hi
        tp = float((pos >= t).sum())
        fp = float((neg >= t).sum())
        fn = len(pos) - tp
        f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
        width = hi - lo
        if f1 > best + 1e-12 or (abs(f1 - best) <= 1e-12 and width > best_width):
            best, best_width, best_t = f1, width, (lo + hi) / 2
    return Calibration(float(best_t), float(best), int(len(pos)), int(len(neg)),
                       float(pos.min()), float(neg.max()) if len(neg) else float("nan"))


def calibration_images(source) -> tuple[dict[str, list[Image.Image]], list[Image.Image], str]:
    """(reference photos per instance of the run's data set, negatives pool images, its origin)."""
    from persrep.find.collection import Collection, iter_paths
    from persrep.generation import shards
    from persrep.storage import Storage

    ds = source.dataset
    train = {n: [ds.read_image(p) for p in ds.instances[n].train] for n in ds.names}
    pz = source.settings.personalization
    blobs: list[bytes] = []
    origin = "none"
    if pz.negatives == "external" and pz.external_negatives:
        loc = resolve_data_path(pz.external_negatives, source.data_path)
        coll = Collection(loc, source.s3_endpoint)
        paths = list(iter_paths(coll))
        step = max(1, len(paths) // MAX_NEGATIVES)
        blobs = [coll.read_bytes(p) for p in paths[::step][:MAX_NEGATIVES]]
        origin = f"external:{pz.external_negatives}"
    elif pz.negatives == "generated":
        st: Storage = source.storage
        keys = [k for k in st.list_finished(shards.STAGE)
                if st.manifest(shards.STAGE, k).meta.get("generator") == "base"]
        for k in keys:
            blobs += shards.images_of(shards.read_unit(st, k))
            if len(blobs) >= MAX_NEGATIVES:
                break
        blobs = blobs[:MAX_NEGATIVES]
        origin = f"generated:{len(keys)} units"
    negatives = []
    for b in blobs:
        try:
            negatives.append(Image.open(io.BytesIO(b)).convert("RGB"))
        except Exception:  # noqa: BLE001 - a broken negative is left out of calibration
            continue
    return train, negatives, origin


def synthetic_positives(source, instances: list[str]) -> dict[str, list[Image.Image]]:
    """The run's cut-and-paste positives per instance (published synthesis units), up to 64 each."""
    from persrep.generation import shards

    st = source.storage
    found: dict[str, list[Image.Image]] = {}
    for k in st.list_finished(shards.STAGE):
        meta = st.manifest(shards.STAGE, k).meta
        inst = meta.get("instance")
        if meta.get("generator") != "cut_paste" or inst not in instances or len(found.get(inst, [])) >= MAX_SYNTHETIC:
            continue
        for b in shards.images_of(shards.read_unit(st, k))[:MAX_SYNTHETIC - len(found.get(inst, []))]:
            try:
                found.setdefault(inst, []).append(Image.open(io.BytesIO(b)).convert("RGB"))
            except Exception:  # noqa: BLE001 - a broken row is left out of calibration
                continue
    return found


def calibrate(extractors, source, pairs: list[tuple[str, str]], batch_size: int = 32):
    """References and thresholds for every (model name, instance) pair of a scan.

    Returns ``(references, calibrations, info)``: ``references[(model, instance)]`` = ``[K, D]``
    reference embeddings; ``calibrations[(model, instance)]`` = :class:`Calibration`.
    """
    import torch

    train, negatives, origin = calibration_images(source)
    synthetic = synthetic_positives(source, sorted({i for _, i in pairs}))
    names = sorted(train)
    flat = [img for n in names for img in train[n]]
    owner = np.asarray([n for n in names for _ in train[n]])
    syn_flat = [img for n in sorted(synthetic) for img in synthetic[n]]
    syn_owner = np.asarray([n for n in sorted(synthetic) for _ in synthetic[n]])
    images = flat + negatives + syn_flat
    models = sorted({m for m, _ in pairs})
    feats: dict[str, list[np.ndarray]] = {m: [] for m in models}
    for start in range(0, len(images), batch_size):
        batch = torch.stack([extractors.transform(im) for im in images[start:start + batch_size]])
        out = extractors.global_features(batch, models)
        for m in models:
            feats[m].append(out[m])
    emb = {m: np.concatenate(v) for m, v in feats.items()}
    references, calibrations = {}, {}
    for model, inst in pairs:
        e = emb[model]
        ref = e[: len(flat)][owner == inst]
        others = e[: len(flat)][owner != inst]
        neg = np.concatenate([others, e[len(flat):len(flat) + len(negatives)]]) if len(negatives) else others
        pos = leave_one_out(ref) if len(ref) > 1 else np.asarray([1.0])
        syn = e[len(flat) + len(negatives):][syn_owner == inst] if len(syn_flat) else e[:0]
        if len(syn):  # photos-in-the-wild stand-ins replace the (too easy) leave-one-out scores
            pos = instance_scores(syn, ref)
        references[(model, inst)] = ref
        calibrations[(model, inst)] = choose_threshold(pos, instance_scores(neg, ref) if len(neg) else [])
    info = {"negatives_pool": origin, "negatives_pool_images": len(negatives),
            "reference_photos": int(len(flat)),
            "synthetic_positives": {n: len(v) for n, v in sorted(synthetic.items())},
            "rule": "max-F1 (cut-and-paste positives, else leave-one-out references, vs negatives pool + "
                    "other instances' references), midpoint of the widest interval"}
    return references, calibrations, info
