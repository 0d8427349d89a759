"""A photo collection: a local directory tree or an ``s3://`` prefix, listed lazily.

The driver only ever holds *paths* (relative to the collection root, ~100 bytes each); image
bytes are read where they are embedded (the Ray actors, or the in-process loop). Listing walks
one directory at a time (:func:`iter_paths`) and yields paths in sorted order, so the listing of
a million-photo tree is streamed into batches rather than built at once.

Which files: names with an image extension Pillow may read (JPEG, PNG, WebP, BMP, TIFF, GIF, and
HEIC/HEIF when the ``pillow-heif`` plugin is installed); hidden files and other names are counted
as *ignored*. A file that cannot be read or decoded is an *unreadable* row with its error, listed
in the outputs and skipped, never fatal (:func:`load_image`).
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow.fs as pafs
from PIL import Image, UnidentifiedImageError

from persrep.data.layout import MAX_IMAGE_PIXELS
from persrep.hashing import sha256_hex
from persrep.storage import Storage

__all__ = ["PHOTO_EXTS", "is_photo_name", "Collection", "iter_paths", "content_hash", "load_image",
           "LoadedImage"]

PHOTO_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".heic", ".heif")
_HEIF_READY: bool | None = None


def _register_heif() -> bool:
    global _HEIF_READY
    if _HEIF_READY is None:
        try:  # optional: HEIC photos (iPhone) need the pillow-heif plugin
            from pillow_heif import register_heif_opener  # type: ignore[import-not-found]

            register_heif_opener()
            _HEIF_READY = True
        except ImportError:
            _HEIF_READY = False
    return _HEIF_READY


def is_photo_name(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return base.lower().endswith(PHOTO_EXTS) and not base.startswith(".")


@dataclass(frozen=True)
class Collection:
    """Where the photos are; cheap to pickle (workers reopen the filesystem)."""

    uri: str
    s3_endpoint: str | None = None

    @property
    def storage(self) -> Storage:
        return Storage(self.uri, self.s3_endpoint)

    def read_bytes(self, rel: str) -> bytes:
        return self.storage.read_bytes(rel)


def iter_paths(collection: Collection, counts: dict[str, int] | None = None) -> Iterator[str]:
    """Photo paths under the collection, sorted, one directory listed at a time.

    ``counts`` (if given) receives ``listed`` and ``ignored`` (non-photo files). Raises
    ``ValueError`` naming the location when it does not exist or is not a directory.
    """
    st = collection.storage
    fs = st.fs
    info = fs.get_file_info(st.base)
    if info.type == pafs.FileType.NotFound:
        raise ValueError(f"--photos {collection.uri}: not found (give a directory or s3://bucket/prefix)")
    if info.type == pafs.FileType.File:
        raise ValueError(f"--photos {collection.uri}: is a file; give the directory that holds the photos")
    counts = counts if counts is not None else {}
    counts.setdefault("listed", 0)
    counts.setdefault("ignored", 0)
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        base = st.path(rel_dir) if rel_dir else st.base
        entries = fs.get_file_info(pafs.FileSelector(base, recursive=False, allow_not_found=True))
        files, dirs = [], []
        for e in entries:
            rel = e.path[len(st.base):].lstrip("/")
            if e.type == pafs.FileType.Directory:
                if not e.base_name.startswith("."):
                    dirs.append(rel)
            elif e.type == pafs.FileType.File:
                if is_photo_name(rel):
                    files.append(rel)
                else:
                    counts["ignored"] += 1
        for rel in sorted(files):
            counts["listed"] += 1
            yield rel
        stack.extend(sorted(dirs, reverse=True))  # depth-first, sorted


def content_hash(data: bytes) -> str:
    """The cache key of an image: sha256 of its bytes (renamed or copied photos hit the cache)."""
    return sha256_hex(data)


@dataclass
class LoadedImage:
    path: str
    content_hash: str | None
    image: Image.Image | None
    error: str | None


def load_image(collection: Collection, rel: str) -> LoadedImage:
    """Read and decode one photo; any failure becomes ``error`` (one line), never an exception."""
    try:
        data = collection.read_bytes(rel)
    except Exception as exc:  # noqa: BLE001 - unreadable files are listed and skipped
        return LoadedImage(rel, None, None, f"read: {str(exc).splitlines()[0][:300]}")
    digest = content_hash(data)
    if rel.lower().endswith((".heic", ".heif")) and not _register_heif():
        return LoadedImage(rel, digest, None, "decode: HEIC needs the pillow-heif package "
                           "(pip install pillow-heif)")
    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > MAX_IMAGE_PIXELS:
            raise ValueError(f"{img.width}x{img.height} pixels is over the {MAX_IMAGE_PIXELS} limit")
        img.load()
        img = img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        text = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc).splitlines()[0] if str(exc) else "")
        return LoadedImage(rel, digest, None, f"decode: {type(exc).__name__}: {text[:300]}".rstrip(": "))
    return LoadedImage(rel, digest, img, None)
