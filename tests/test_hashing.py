"""One place for hashing (persrep/hashing.py): keys, seeds and checksums keep their exact values.

The golden values were computed with the code before hashing moved into one module (commit
ee6c3b5): a changed byte format would silently re-key every published unit or change row seeds.
Each is also checked against a hashlib oracle written out here, independently of persrep.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
from PIL import Image

from persrep.captions.backends import model_identity
from persrep.config import content_key
from persrep.evaluation.cache import EmbeddingCache, image_list_key
from persrep.hashing import directory_digest, file_sha256, image_fingerprint, sha256_hex, stable_seed
from persrep.models.backbones import weights_file_sha256
from persrep.models.diffusion import component_identity
from persrep.storage import sha256_bytes
from persrep.tracking.store import mlflow_key


def _model_dir(d):
    d.mkdir()
    (d / "config.json").write_text('{"a": 1}')
    (d / "tok.txt").write_text("x y")
    (d / "w.safetensors").write_bytes(b"\0" * 100)
    (d / "sub").mkdir()
    (d / "sub/other.bin").write_bytes(b"abc")
    (d / "readme.md").write_text("hi")
    return d


def _image():
    return Image.fromarray((np.arange(48 * 32 * 3) % 251).astype(np.uint8).reshape(32, 48, 3))


def test_unit_keys_and_seeds_keep_their_values():
    # a fixed section (a settings object would change whenever a field is added, operational or not)
    part = {"lr": 0.001, "rank": 4, "targets": ["blocks.5", "blocks.6"]}
    assert content_key(part, {"b": 2, "a": [1, 2.5]}, "x", 3, None) == "de75215459e8ffa1"
    assert stable_seed("neg", "mug", 5.0, "none", 0, 3) == 1364588357
    assert stable_seed("class-image", 0, 1) == 273103170
    img = _image()
    assert image_fingerprint(img) == "c7b74b8fdfbe97ce"
    assert image_fingerprint(img.convert("L")) == "425feaed254c6221"
    assert image_list_key(["a/1.jpg", "b/2.png"]) == "2-b41c93dc4d590ab2"
    assert EmbeddingCache(cache_dir="/c")._path("global", "ek", "lk").name == "ff1528e5e0c45595a0c3735a.npy"
    assert sha256_bytes(b"hello") == hashlib.sha256(b"hello").hexdigest()
    assert mlflow_key("x" * 300).endswith("-0d4e2ca9")


def test_against_a_hashlib_oracle():
    parts = ["neg", "mug", 4.0, 7]
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    assert stable_seed(*parts) == int(hashlib.sha256(blob).hexdigest()[:8], 16) & 0x7FFFFFFF
    img = _image()
    h = hashlib.sha256(f"{img.mode}:{img.size}".encode())
    h.update(img.tobytes())
    assert image_fingerprint(img) == h.hexdigest()[:16]
    assert sha256_hex("abc", 10) == hashlib.sha256(b"abc").hexdigest()[:10]
    assert sha256_hex(b"abc") == hashlib.sha256(b"abc").hexdigest()


def test_directory_and_file_digests_keep_their_values(tmp_path):
    d = _model_dir(tmp_path / "model")
    assert component_identity(str(d))["content"] == "c6e22b47e49f82f4"
    assert model_identity(str(d)) == {"model_dir_sha256": "c3d0e79055caf23066d67b0a"}
    weights = "cd00e292c5970d3c5e2f0ffa5171e555bc46bfc4faddfb4a418b6840b86e79a3"
    assert weights_file_sha256(d / "w.safetensors") == file_sha256(d / "w.safetensors") == weights
    # the streaming digest equals hashing the concatenated entries in sorted path order
    seen = []

    def entry(rel, path):
        seen.append(rel)
        return rel.encode() + b"|"

    got = directory_digest(d, entry, 64)
    assert seen == sorted(seen) and len(seen) == 5
    assert got == hashlib.sha256("".join(r + "|" for r in seen).encode()).hexdigest()


def test_hashlib_is_called_in_one_place():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    users = sorted(str(p.relative_to(root)) for p in (root / "persrep").rglob("*.py")
                   if "import hashlib" in p.read_text())
    # report/thumbs.py names thumbnail files (sha1, not a key); changing it would rename them
    assert users == ["persrep/hashing.py", "persrep/report/thumbs.py"], users
