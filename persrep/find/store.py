"""Embeddings of photos cached as parquet shards keyed by (extractor, image content hash).

Layout: ``<cache root>/find-embeddings/<extractor key>/<shard>.parquet`` with columns
``content_hash`` (sha256 of the image bytes) and ``embedding`` (list<float32>). The extractor key
names the backbone, the adapter key (or "pretrained") and the global feature
(:func:`persrep.find.models.extractor_key`), so a re-run, a second collection holding the same
photos, or a new instance with another adapter reuses every embedding it can, and an interrupted
job resumes: each embedded batch is written as one shard (atomic write: temporary name + rename
locally, one PUT on S3) before its scores leave the worker.

A worker opens the store once: it reads only the ``content_hash`` column of the shards present
(a few tens of bytes per image) into an index, and loads a shard's embeddings when a batch needs
them (a small LRU of shards: batches of a re-run hit the shards in the order they were written).
Shards written by other workers after that are not seen; the photo is then embedded again, which
is correct, only slower.
"""

from __future__ import annotations

import io
from collections import OrderedDict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from persrep.config import content_key
from persrep.storage import Storage

__all__ = ["STAGE", "EmbeddingStore"]

STAGE = "find-embeddings"


class EmbeddingStore:
    def __init__(self, storage: Storage, extractor_key: str, cache_shards: int = 4):
        self.storage, self.extractor_key = storage, extractor_key
        self.dir = f"{STAGE}/{extractor_key}"
        self.index: dict[str, str] = {}  # content hash -> shard file name
        self._shards: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()
        self._cache_shards = cache_shards
        for name in self.storage.list_dir(self.dir):
            if not name.endswith(".parquet") or ".tmp-" in name:
                continue
            try:
                data = self.storage.read_bytes(f"{self.dir}/{name}")
                hashes = pq.read_table(io.BytesIO(data), columns=["content_hash"]).column(0).to_pylist()
            except Exception:  # noqa: BLE001 - an unreadable shard is ignored (its photos are re-embedded)
                continue
            for h in hashes:
                self.index.setdefault(h, name)

    def __len__(self) -> int:
        return len(self.index)

    def _shard(self, name: str) -> dict[str, np.ndarray]:
        if name not in self._shards:
            table = pq.read_table(io.BytesIO(self.storage.read_bytes(f"{self.dir}/{name}")))
            hashes = table.column("content_hash").to_pylist()
            emb = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)
            self._shards[name] = dict(zip(hashes, emb))
            while len(self._shards) > self._cache_shards:
                self._shards.popitem(last=False)
        self._shards.move_to_end(name)
        return self._shards[name]

    def lookup(self, hashes: list[str]) -> dict[str, np.ndarray]:
        """The cached embeddings among ``hashes`` (missing ones are absent from the result)."""
        found: dict[str, np.ndarray] = {}
        for h in hashes:
            name = self.index.get(h)
            if name is not None:
                vec = self._shard(name).get(h)
                if vec is not None:
                    found[h] = vec
        return found

    def add(self, hashes: list[str], embeddings: np.ndarray) -> str | None:
        """Write one shard with these embeddings (deduplicated); returns its file name."""
        keep: dict[str, np.ndarray] = {}
        for h, e in zip(hashes, np.asarray(embeddings, dtype=np.float32)):
            if h not in self.index:
                keep.setdefault(h, e)
        if not keep:
            return None
        names = sorted(keep)
        dim = len(next(iter(keep.values())))
        table = pa.table({"content_hash": pa.array(names, pa.string()),
                          "embedding": pa.FixedSizeListArray.from_arrays(
                              pa.array(np.stack([keep[h] for h in names]).ravel(), pa.float32()), dim)})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        name = f"{content_key('shard', names)}.parquet"
        self.storage.write_bytes(f"{self.dir}/{name}", buf.getvalue())
        for h in names:
            self.index[h] = name
        return name
