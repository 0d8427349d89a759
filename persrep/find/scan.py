"""One batch of photo paths -> one score per (model, instance) pair: the body of the scan.

:class:`Scanner` is what every embedding worker holds: one loaded backbone with its adapters
(:class:`~persrep.find.models.Extractors`) and one :class:`~persrep.find.store.EmbeddingStore`
per model. ``scanner(paths)`` reads each photo's bytes (here, in the worker), hashes them,
decodes them, takes cached embeddings where the store has them, embeds the rest (and writes
them to the store before returning), and scores each photo for each pair: ``score`` = max cosine
to the instance's reference embeddings under that model, ``rival`` = max cosine to the reference
embeddings of every *other* instance of the run's data set under the same model (the competition
of :mod:`persrep.find.calibrate`). Unreadable photos come back as rows with an ``error`` and no
scores. The in-process loop and the Ray actor pool call the same method.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from persrep.evaluation.features import cosine_similarity_matrix
from persrep.find.collection import Collection, load_image
from persrep.find.models import Extractors, ModelSpec, extractor_key
from persrep.find.store import EmbeddingStore
from persrep.storage import Storage

__all__ = ["ScanPlan", "Scanner", "OUTPUT_SCHEMA", "score_pairs"]

OUTPUT_SCHEMA = pa.schema([("path", pa.string()), ("content_hash", pa.string()),
                           ("error", pa.string()), ("scores", pa.list_(pa.float32())),
                           ("rivals", pa.list_(pa.float32())),
                           ("embedded", pa.int32()), ("worker", pa.string())])


@dataclass
class ScanPlan:
    """Everything a worker needs; small and picklable (no pixels, no models)."""

    source: object  # persrep.find.source.FindSource
    collection: Collection
    cache_root: str
    pairs: list[tuple[str, str]]  # (model name, instance): one score column each
    # model name -> (reference embeddings [R, D] of EVERY instance of the data set, owner of each row)
    references: dict[str, tuple[np.ndarray, list[str]]] = field(default_factory=dict)
    batch_size: int = 32
    share_trunk: bool = True

    @property
    def specs(self) -> list[ModelSpec]:
        keys = {t.instance: t.adapter_key for t in self.source.targets}
        names = sorted({m for m, _ in self.pairs})
        return [ModelSpec(n, None if n == "pretrained" else keys[n]) for n in names]

    def open_stores(self) -> dict[str, EmbeddingStore]:
        """Each model's embedding store under the cache root, indexed as it is now."""
        cache = Storage(self.cache_root, self.source.s3_endpoint)
        return {s.name: EmbeddingStore(cache, extractor_key(self.source, s)) for s in self.specs}


def score_pairs(emb: dict[str, np.ndarray], references: dict[str, tuple[np.ndarray, list[str]]],
                pairs: list[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, rivals)``, each ``[N, len(pairs)]``: per pair (model, instance), the photos' max
    cosine to the instance's references and to the best other instance's references (-1 if none)."""
    n = len(next(iter(emb.values())))
    scores = np.zeros((n, len(pairs)), dtype=np.float32)
    rivals = np.full((n, len(pairs)), -1.0, dtype=np.float32)
    per_model: dict[str, dict[str, np.ndarray]] = {}
    for model in sorted({m for m, _ in pairs}):
        ref, owners = references[model]
        owners_arr = np.asarray(owners)
        sims = cosine_similarity_matrix(emb[model], ref)
        per_model[model] = {o: sims[:, owners_arr == o].max(axis=1) for o in dict.fromkeys(owners)}
    for j, (model, inst) in enumerate(pairs):
        by_owner = per_model[model]
        scores[:, j] = by_owner[inst]
        others = [v for o, v in by_owner.items() if o != inst]
        if others:
            rivals[:, j] = np.max(np.stack(others), axis=0)
    return scores, rivals


class Scanner:
    def __init__(self, plan: ScanPlan, extractors: Extractors | None = None,
                 torch_threads: int | None = None):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.plan = plan
        self.extractors = extractors or Extractors(plan.source, plan.specs, plan.share_trunk)
        self.stores = plan.open_stores()
        self.worker = f"{os.uname().nodename}:{os.getpid()}"

    def embeddings(self, loaded) -> tuple[dict[str, np.ndarray], int]:
        """{model: [N, D]} for the decoded images ``loaded``; cached ones are not recomputed."""
        hashes = [item.content_hash for item in loaded]
        have = {m: st.lookup(hashes) for m, st in self.stores.items()}
        missing = [i for i, h in enumerate(hashes) if any(h not in have[m] for m in self.stores)]
        computed: dict[str, np.ndarray] = {}
        if missing:
            models = sorted(m for m in self.stores if any(hashes[i] not in have[m] for i in missing))
            x = torch.stack([self.extractors.transform(loaded[i].image) for i in missing])
            computed = self.extractors.global_features(x, models)
            for m in models:
                self.stores[m].add([hashes[i] for i in missing], computed[m])
        out = {}
        for m in self.stores:
            pos = {i: j for j, i in enumerate(missing)}
            out[m] = np.stack([have[m][h] if h in have[m] else computed[m][pos[i]]
                               for i, h in enumerate(hashes)]) if hashes else np.zeros((0, 1), np.float32)
        return out, len(missing) * len(computed)

    def __call__(self, paths: list[str]) -> pa.Table:
        loaded = [load_image(self.plan.collection, p) for p in paths]
        good = [item for item in loaded if item.image is not None]
        scores = np.zeros((len(good), len(self.plan.pairs)), dtype=np.float32)
        rivals = np.zeros_like(scores)
        embedded = 0
        if good:
            emb, embedded = self.embeddings(good)
            scores, rivals = score_pairs(emb, self.plan.references, self.plan.pairs)
        rows, k = [], 0
        for item in loaded:
            if item.image is None:
                rows.append({"path": item.path, "content_hash": item.content_hash, "error": item.error,
                             "scores": None, "rivals": None, "embedded": 0, "worker": self.worker})
            else:
                rows.append({"path": item.path, "content_hash": item.content_hash, "error": None,
                             "scores": scores[k].tolist(), "rivals": rivals[k].tolist(), "embedded": 0, "worker": self.worker})
                k += 1
        if rows:
            rows[0]["embedded"] = embedded
        return pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)
