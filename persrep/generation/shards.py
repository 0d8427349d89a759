"""Synthetic images as parquet shards: the schema, the writer and a reader by unit.

One *synthesis unit* is one group of rows (a data configuration x an instance, or a category's
negatives pool), published at ``<root>/synthesis/<unit key>/part-NNNNN.parquet`` with a
manifest (row counts, checksums) written last. A training job reads exactly its own units, so it
never touches other instances' rows.
"""

from __future__ import annotations

import io
from dataclasses import asdict
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from persrep.generation.base import SampledImage, SampleRow
from persrep.storage import Storage

STAGE = "synthesis"
SCHEMA = pa.schema([
    ("instance", pa.string()), ("role", pa.string()), ("generator", pa.string()),
    ("cfg", pa.float32()), ("caption_source", pa.string()), ("prompt", pa.string()),
    ("seed", pa.int64()), ("index", pa.int32()), ("image", pa.binary()), ("mask", pa.binary()),
    ("width", pa.int32()), ("height", pa.int32()), ("filter_score", pa.float32()),
    ("kept", pa.bool_()), ("error", pa.string()), ("data_key", pa.string()),
])


def png_bytes(img: Image.Image | None) -> bytes | None:
    if img is None:
        return None
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)  # speed over size: shards are intermediate data
    return buf.getvalue()


def record(sample: SampledImage | None, row: SampleRow, data_key: str, *,
           filter_score: float | None = None, kept: bool = True,
           error: str | None = None) -> dict[str, Any]:
    """One parquet row. A failed row keeps its identity and error, with no image."""
    img = sample.image if sample is not None else None
    return {**{k: v for k, v in asdict(row).items()},
            "image": png_bytes(img), "mask": png_bytes(sample.mask) if sample is not None else None,
            "width": img.width if img is not None else None,
            "height": img.height if img is not None else None,
            "filter_score": filter_score, "kept": bool(kept and error is None), "error": error,
            "data_key": data_key}


def to_table(records: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(records, schema=SCHEMA)


def table_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


ERRORS_IN_MANIFEST = 20  # distinct row errors kept in a unit's manifest (all are in the rows)


def unit_counts(records: list[dict[str, Any]]) -> dict[str, Any]:
    """What a unit's rows add up to, for its manifest and its verdict
    (persrep.pipeline.stages.synthesis.synthesis_verdict): rows written (every filter attempt is a row), images requested (distinct row indices), kept,
    row errors with the first distinct messages, and the filter's score distribution."""
    import numpy as np

    errors = [r["error"] for r in records if r["error"] is not None]
    scores = np.array([r["filter_score"] for r in records if r.get("filter_score") is not None], dtype=float)
    scores = scores[np.isfinite(scores)]
    counts: dict[str, Any] = {
        "rows": len(records), "requested": len({r["index"] for r in records}),
        "kept": sum(bool(r["kept"]) for r in records), "errors": len(errors),
        "error_messages": list(dict.fromkeys(errors))[:ERRORS_IN_MANIFEST]}
    if len(scores):
        counts["filter_scores"] = {"n": int(len(scores)), "min": float(scores.min()),
                                   "median": float(np.median(scores)), "max": float(scores.max())}
    return counts


def publish_unit(storage: Storage, key: str, records: list[dict[str, Any]], rows_per_shard: int,
                 meta: dict[str, Any]) -> dict[str, Any]:
    """Write a unit's shards then its manifest (meta + :func:`unit_counts`); returns the manifest meta."""
    counts = unit_counts(records)
    with storage.unit_writer(STAGE, key, {**meta, **counts}) as w:
        for i in range(0, max(len(records), 1), rows_per_shard):
            w.write(f"part-{i // rows_per_shard:05d}.parquet", table_bytes(to_table(records[i:i + rows_per_shard])))
    return {**meta, **counts}


def read_unit(storage: Storage, key: str, *, kept_only: bool = True,
              columns: list[str] | None = None) -> pa.Table:
    """All rows of one published unit (checksums verified), optionally only the kept ones."""
    man = storage.manifest(STAGE, key)
    tables = [pq.read_table(io.BytesIO(storage.read_unit_file(STAGE, key, name, man)), columns=columns)
              for name in sorted(man.files) if name.endswith(".parquet")]
    table = pa.concat_tables(tables) if tables else to_table([])
    if kept_only and "kept" in table.column_names:
        table = table.filter(pc.equal(table["kept"], True))
    return table


def images_of(table: pa.Table) -> list[bytes]:
    return [b for b in table.column("image").to_pylist() if b is not None]
