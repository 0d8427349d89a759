"""Hashing for keys, seeds and checksums: the one place that calls :mod:`hashlib` (bottom layer).

Every unit key, row seed, cache key and file checksum in persrep is a sha256 of some bytes; what
differs is which bytes. The byte formats below are frozen: changing one changes published keys
(every finished unit would be recomputed) or row seeds (other pixels), so each caller keeps its
exact format and only the digest lives here.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def sha256_hex(data: bytes | str, length: int | None = None) -> str:
    """Hex sha256 of ``data`` (str is UTF-8 encoded), cut to ``length`` characters if given."""
    digest = hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()
    return digest if length is None else digest[:length]


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (weights files are GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def directory_digest(root: Path, entry: Callable[[str, Path], bytes], length: int) -> str:
    """Hex sha256 over a directory's files in sorted path order; ``entry(relative posix path,
    path)`` gives the bytes each file contributes (b"" to skip it), cut to ``length``."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(entry(path.relative_to(root).as_posix(), path))
    return digest.hexdigest()[:length]


def stable_seed(*parts: Any) -> int:
    """A seed in [0, 2**31) derived from ``parts`` (same on every machine and Python run).

    Use it to give every row its own seed, e.g. ``stable_seed("neg", category, seed, i)``,
    so distinct rows never share noise and any one row can be regenerated alone.
    """
    blob = json.dumps(list(parts), sort_keys=True, default=str)
    return int(sha256_hex(blob, 8), 16) & 0x7FFFFFFF


def image_fingerprint(image: Any) -> str:
    """Content hash of a PIL image's pixels (mode and size included; file format and metadata not)."""
    return sha256_hex(f"{image.mode}:{image.size}".encode() + image.tobytes(), 16)
