"""The storage root: a local path or ``s3://bucket/prefix``, with units published atomically.

A *unit* is the output of one piece of work (a generator for an instance, a shard set, an
adapter, an evaluation), stored under ``<root>/<stage>/<key>/``. Its files are written first;
``MANIFEST.json`` (size, modification time and sha256 of every file, plus metadata) is written last. A unit exists for
readers only once its manifest does, so a crash never leaves a half-written unit that looks
finished, and a re-run simply rewrites the files of an unfinished unit. Reads verify checksums;
a re-run's skip check (:meth:`Storage.is_intact`) compares sizes and times and reads no data.

One API for both backends: :mod:`pyarrow.fs` (local rename is atomic; an S3 PUT is atomic per
object). S3 credentials come from the usual ``AWS_*`` environment variables; the endpoint from the
settings or ``$AWS_ENDPOINT_URL`` (e.g. a moto server on loopback in the tests).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from persrep.errors import StorageError  # noqa: F401 (re-exported)
from persrep.hashing import sha256_hex

MANIFEST = "MANIFEST.json"
log = logging.getLogger(__name__)
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.\-=+]+$")


class CorruptUnitError(StorageError):
    """A published file whose bytes do not match its manifest checksum. Not retried: the unit is
    unpublished when found, and only a re-run (which recomputes it) can mend it."""

    retryable = False


class StorageUnavailableError(StorageError):
    """The storage root cannot be reached (endpoint down, network): the job cannot go on."""


def validate_root_uri(root: str) -> None:
    """Fail with one clear line on a malformed storage root."""
    if not root or not root.strip():
        raise ValueError("empty storage root: give a local directory or s3://bucket/prefix")
    if "://" not in root:
        return
    parsed = urlparse(root)
    if parsed.scheme == "file":
        return
    if parsed.scheme != "s3":
        raise ValueError(f"unsupported storage scheme {parsed.scheme!r} in {root!r}: use a local "
                         "path or s3://bucket/prefix")
    if not _BUCKET_RE.fullmatch(parsed.netloc or ""):
        raise ValueError(f"malformed S3 URI {root!r}: bucket {parsed.netloc!r} must be 3-63 "
                         "lower-case letters, digits, '.' or '-' (s3://bucket/prefix)")


def sha256_bytes(data: bytes) -> str:
    return sha256_hex(data)


def _mtime_ns(info: pafs.FileInfo) -> int | None:
    """A file's modification time in integer nanoseconds (None when the filesystem has none)."""
    ns = getattr(info, "mtime_ns", None)
    if ns is not None:
        return int(ns)
    return None if info.mtime is None else int(info.mtime.timestamp() * 1e9)


def _check_name(name: str, what: str) -> None:
    parts = name.split("/")
    if any(p in ("", ".", "..") or not _SAFE_NAME.fullmatch(p) for p in parts):
        raise StorageError(f"unsafe {what} {name!r}: use letters, digits, '_.-=+' and '/' only")


@dataclass
class Manifest:
    stage: str
    key: str
    files: dict[str, dict[str, Any]]  # name -> {"sha256", "size"}
    meta: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0

    def to_json(self) -> bytes:
        return json.dumps({"stage": self.stage, "key": self.key, "files": self.files,
                           "meta": self.meta, "created": self.created}, indent=1,
                          sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Manifest":
        d = json.loads(data)
        return cls(d["stage"], d["key"], d["files"], d.get("meta", {}), d.get("created", 0.0))


class Storage:
    """A storage root. Cheap to pickle (the filesystem is rebuilt lazily in each process)."""

    def __init__(self, root: str, s3_endpoint: str | None = None):
        validate_root_uri(root)
        self.root = root.rstrip("/")
        self.s3_endpoint = s3_endpoint
        self._fs: pafs.FileSystem | None = None
        parsed = urlparse(self.root)
        self.is_s3 = parsed.scheme == "s3"
        if self.is_s3:
            self.base = f"{parsed.netloc}{parsed.path}".rstrip("/")
            self.bucket = parsed.netloc
        else:
            local = parsed.path if parsed.scheme == "file" else self.root
            self.base = str(Path(local).expanduser().absolute())
            self.bucket = None

    @classmethod
    def from_settings(cls, storage_settings: Any) -> "Storage":
        return cls(storage_settings.root, storage_settings.s3_endpoint)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fs"] = None
        return state

    # -- filesystem -----------------------------------------------------------------------
    @property
    def fs(self) -> pafs.FileSystem:
        if self._fs is None:
            self._fs = self._make_fs()
        return self._fs

    def _make_fs(self) -> pafs.FileSystem:
        if not self.is_s3:
            return pafs.LocalFileSystem()
        endpoint = self.s3_endpoint or os.environ.get("AWS_ENDPOINT_URL")
        kwargs: dict[str, Any] = {"region": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                                  "connect_timeout": 5, "request_timeout": 30}
        if endpoint:
            ep = urlparse(endpoint)
            kwargs["endpoint_override"] = ep.netloc or ep.path
            kwargs["scheme"] = ep.scheme or "https"
        if os.environ.get("AWS_ACCESS_KEY_ID"):
            kwargs["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
            kwargs["secret_key"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
            if os.environ.get("AWS_SESSION_TOKEN"):
                kwargs["session_token"] = os.environ["AWS_SESSION_TOKEN"]
        return pafs.S3FileSystem(**kwargs)

    def path(self, *parts: str) -> str:
        """Filesystem path (for ``self.fs``) of a relative location under the root."""
        return "/".join([self.base, *[p.strip("/") for p in parts if p]])

    def uri(self, *parts: str) -> str:
        rel = "/".join(p.strip("/") for p in parts if p)
        return f"{self.root}/{rel}" if rel else self.root

    def check_writable(self) -> None:
        """Probe the root once, before compute: a clear line if it cannot be written."""
        probe = self.path(f".persrep-write-probe-{uuid.uuid4().hex[:8]}")
        try:
            if self.is_s3:
                info = self.fs.get_file_info(self.bucket)
                if info.type == pafs.FileType.NotFound:
                    raise StorageError(f"S3 bucket {self.bucket!r} does not exist at "
                                       f"{self._endpoint_text()}: create it (e.g. `aws s3 mb "
                                       f"s3://{self.bucket}`) or fix storage.root")
            else:
                self.fs.create_dir(self.base, recursive=True)
            with self.fs.open_output_stream(probe) as out:
                out.write(b"ok")
            self.fs.delete_file(probe)
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - translated into one actionable line
            raise self._error(exc, f"cannot write to storage root {self.root}") from None

    def _endpoint_text(self) -> str:
        return self.s3_endpoint or os.environ.get("AWS_ENDPOINT_URL") or "the AWS default endpoint"

    def _explain(self, exc: Exception, what: str) -> str:
        return str(self._error(exc, what))

    def _error(self, exc: Exception, what: str) -> StorageError:
        """One actionable line; :class:`StorageUnavailableError` when the endpoint is unreachable."""
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if self.is_s3:
            low = text.lower()
            squashed = low.replace(" ", "").replace("_", "")  # ACCESS_DENIED, Access Denied
            if "accessdenied" in squashed or "signature" in low or "invalidaccesskey" in squashed:
                hint = "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
            elif "connect" in low or "curl" in low or "timed out" in low:
                return StorageUnavailableError(
                    f"{what}: {text} (is the S3 endpoint {self._endpoint_text()} up? "
                    "(storage.s3_endpoint or $AWS_ENDPOINT_URL); finished units are kept: re-run to resume)")
            else:
                hint = "check the bucket, credentials and endpoint"
            return StorageError(f"{what}: {text} ({hint})")
        return StorageError(f"{what}: {text} (check the directory exists and is writable, or set storage.root)")

    # -- plain objects --------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write one object atomically (local: temp name + rename; S3: a PUT is atomic)."""
        dest = self.path(rel)
        try:
            if self.is_s3:
                with self.fs.open_output_stream(dest) as out:
                    out.write(data)
                return
            parent = dest.rsplit("/", 1)[0]
            self.fs.create_dir(parent, recursive=True)
            tmp = f"{dest}.tmp-{uuid.uuid4().hex[:8]}"
            with self.fs.open_output_stream(tmp) as out:
                out.write(data)
            self.fs.move(tmp, dest)
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, f"cannot write {self.uri(rel)}") from None

    def read_bytes(self, rel: str) -> bytes:
        try:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read()
        except FileNotFoundError:
            raise StorageError(f"{self.uri(rel)}: not found") from None
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, f"cannot read {self.uri(rel)}") from None

    def exists(self, rel: str) -> bool:
        try:
            return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, f"cannot stat {self.uri(rel)}") from None

    def list_dir(self, rel: str) -> list[str]:
        """Names directly under ``rel`` (empty when it does not exist)."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path(rel), allow_not_found=True))
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, f"cannot list {self.uri(rel)}") from None
        return sorted(i.base_name for i in infos)

    def list_files(self, rel: str = "") -> list[tuple[str, int]]:
        """Every file under ``rel``, recursively: (path relative to ``rel``, size), sorted."""
        base = self.path(rel) if rel else self.base
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, f"cannot list {self.uri(rel)}") from None
        out = [(i.path[len(base):].lstrip("/"), i.size or 0) for i in infos
               if i.type == pafs.FileType.File]
        return sorted(out)

    def delete_dir(self, rel: str) -> None:
        p = self.path(rel)
        if self.fs.get_file_info(p).type != pafs.FileType.NotFound:
            self.fs.delete_dir(p)

    # -- units ----------------------------------------------------------------------------
    def unit_rel(self, stage: str, key: str) -> str:
        _check_name(stage, "stage")
        _check_name(key, "unit key")
        return f"{stage}/{key}"

    def is_finished(self, stage: str, key: str) -> bool:
        return self.exists(f"{self.unit_rel(stage, key)}/{MANIFEST}")

    def is_intact(self, stage: str, key: str) -> bool:
        """Finished *and* every file present with its manifest's size and time (else its
        checksum verified): what a re-run may skip, found without reading the unit's data.

        A finished unit that fails verification (a file corrupted, truncated or deleted since it
        was published) is unpublished here: its manifest is removed, so it counts as unfinished
        and the stage that produces it recomputes it. Connection errors propagate.
        """
        return self.intact_manifest(stage, key) is not None

    def intact_manifest(self, stage: str, key: str) -> Manifest | None:
        """:meth:`is_intact` that returns the manifest (None when the unit is not intact), so a
        caller that needs the unit's meta does not read the manifest again.

        The check reads no unit data: the manifest records each file's size and modification time
        (``mtime_ns``, taken when the unit was published); one stat per file (on s3 a HEAD) must
        find every file with that size and time. A file missing or of another size: the unit is
        not intact. A file with the same size but another time (rewritten, copied without its
        times): its checksum is verified, as for manifests written before sizes and times were
        recorded. The checksum of every file is verified whenever its data is read
        (:meth:`read_unit_file`), so a file altered without changing its size or time is still
        refused before its data is used. On s3: a HEAD + GET of the manifest and a HEAD per file.
        """
        rel = f"{self.unit_rel(stage, key)}/{MANIFEST}"
        try:
            with self.fs.open_input_stream(self.path(rel)) as f:
                data = f.read()
        except FileNotFoundError:
            return None
        except Exception as exc:  # noqa: BLE001 - connection errors propagate as one line
            raise self._error(exc, f"cannot read {self.uri(rel)}") from None
        try:
            try:
                man = Manifest.from_json(data)
            except (ValueError, KeyError, TypeError):
                raise CorruptUnitError(f"{self.uri(rel)}: not a valid manifest: delete the unit") from None
            for name in self._files_to_checksum(stage, key, man):
                self.read_unit_file(stage, key, name, man)
            return man
        except CorruptUnitError as exc:
            reason = str(exc).split(": delete the unit", 1)[0].split(": unpublished", 1)[0]
        self._unpublish(stage, key)
        log.warning("%s: unpublished unit %s; it is recomputed now", reason, self.uri(stage, key))
        return None

    def _files_to_checksum(self, stage: str, key: str, man: Manifest) -> list[str]:
        """The files of a published unit whose bytes the skip check must read: none when every
        file has its recorded size and time; every file of a manifest without them (older
        manifests). Raises :class:`CorruptUnitError` for a file missing or of another size."""
        names = sorted(man.files)
        if not all(isinstance(man.files[n], dict) and "size" in man.files[n] and "mtime_ns" in man.files[n]
                   for n in names):
            return names  # a manifest from before sizes and times were recorded: today's full check
        rel = self.unit_rel(stage, key)
        try:
            infos = self.fs.get_file_info([self.path(rel, n) for n in names]) if names else []
        except Exception as exc:  # noqa: BLE001 - connection errors propagate as one line
            raise self._error(exc, f"cannot stat the files of {self.uri(stage, key)}") from None
        stale = []
        for name, info in zip(names, infos):
            want = man.files[name]
            if info.type != pafs.FileType.File:
                raise CorruptUnitError(f"{self.uri(stage, key, name)}: missing although its manifest lists it")
            if info.size != want["size"]:
                raise CorruptUnitError(f"{self.uri(stage, key, name)}: {info.size} bytes, its manifest "
                                       f"says {want['size']} (truncated or overwritten)")
            if _mtime_ns(info) != want["mtime_ns"]:
                stale.append(name)  # rewritten or copied since it was published: read it
        return stale

    def _unpublish(self, stage: str, key: str) -> None:
        """Remove a unit's manifest (it then counts as unfinished and is recomputed); idempotent."""
        try:
            self.fs.delete_file(self.path(self.unit_rel(stage, key), MANIFEST))
        except FileNotFoundError:
            pass
        except OSError as exc:
            if "not exist" not in str(exc).lower() and "not found" not in str(exc).lower():
                raise self._error(exc, f"cannot unpublish {self.uri(stage, key)}") from None

    def list_finished(self, stage: str) -> list[str]:
        return [k for k in self.list_dir(stage) if ".tmp-" not in k and self.is_finished(stage, k)]

    def manifest(self, stage: str, key: str) -> Manifest:
        rel = f"{self.unit_rel(stage, key)}/{MANIFEST}"
        if not self.exists(rel):
            raise StorageError(f"unit {self.uri(stage, key)} is not finished (no {MANIFEST}): "
                               "re-run the stage that produces it")
        try:
            return Manifest.from_json(self.read_bytes(rel))
        except (ValueError, KeyError, TypeError):
            raise CorruptUnitError(f"{self.uri(rel)}: not a valid manifest: delete the unit "
                                   f"({self.uri(stage, key)}) and re-run to regenerate it") from None

    @contextmanager
    def unit_writer(self, stage: str, key: str, meta: dict[str, Any] | None = None) -> Iterator["UnitWriter"]:
        """Write a unit's files, then publish its manifest last (only if the block succeeds)."""
        writer = UnitWriter(self, stage, key, dict(meta or {}))
        yield writer
        writer.publish()

    def publish(self, stage: str, key: str, files: dict[str, bytes],
                meta: dict[str, Any] | None = None) -> Manifest:
        with self.unit_writer(stage, key, meta) as w:
            for name, data in files.items():
                w.write(name, data)
        return w.manifest  # type: ignore[return-value]

    def read_unit_file(self, stage: str, key: str, name: str, manifest: Manifest | None = None) -> bytes:
        """Read a published file and verify it against the manifest checksum."""
        man = manifest or self.manifest(stage, key)
        if name not in man.files:
            raise StorageError(f"unit {self.uri(stage, key)} has no file {name!r} "
                               f"(has: {sorted(man.files)[:10]})")
        rel = f"{self.unit_rel(stage, key)}/{name}"
        try:
            data = self.read_bytes(rel)
        except StorageError:
            if self.exists(rel):
                raise
            self._unpublish(stage, key)
            raise CorruptUnitError(f"{self.uri(stage, key, name)}: missing although its manifest "
                                   f"lists it: unpublished {self.uri(stage, key)}; re-run to "
                                   "recompute it") from None
        if sha256_bytes(data) != man.files[name]["sha256"]:
            # its data is never used: the unit is unpublished, so a re-run recomputes it
            self._unpublish(stage, key)
            raise CorruptUnitError(f"{self.uri(stage, key, name)}: checksum mismatch with its "
                                   f"manifest (corrupted or overwritten): unpublished "
                                   f"{self.uri(stage, key)}; re-run to recompute it")
        return data

    def verify_unit(self, stage: str, key: str) -> Manifest:
        man = self.manifest(stage, key)
        for name in man.files:
            self.read_unit_file(stage, key, name, man)
        return man


class UnitWriter:
    def __init__(self, storage: Storage, stage: str, key: str, meta: dict[str, Any]):
        self.storage, self.stage, self.key, self.meta = storage, stage, key, meta
        self.rel = storage.unit_rel(stage, key)
        self.files: dict[str, dict[str, Any]] = {}
        self.manifest: Manifest | None = None
        if storage.is_finished(stage, key):
            raise StorageError(f"unit {storage.uri(stage, key)} is already published; units are "
                               "immutable (delete it first to regenerate)")

    def write(self, name: str, data: bytes) -> None:
        _check_name(name, "file name")
        if name == MANIFEST:
            raise StorageError(f"{MANIFEST} is reserved")
        self.storage.write_bytes(f"{self.rel}/{name}", data)
        self.files[name] = {"sha256": sha256_bytes(data), "size": len(data)}

    def _record_times(self) -> None:
        """Each written file's modification time as storage reports it (one stat per file; on s3
        a HEAD): with the size, what a re-run's skip check compares instead of reading the bytes.
        A file whose time cannot be read gets none (its unit is then checked by checksum)."""
        names = sorted(self.files)
        if not names:
            return
        try:
            infos = self.storage.fs.get_file_info([self.storage.path(self.rel, n) for n in names])
        except Exception:  # noqa: BLE001 - optional: the full checksum check still works without it
            return
        for name, info in zip(names, infos):
            mtime = _mtime_ns(info)
            if info.type == pafs.FileType.File and info.size == self.files[name]["size"] and mtime is not None:
                self.files[name]["mtime_ns"] = mtime

    def write_file(self, name: str, local_path: str | Path) -> None:
        self.write(name, Path(local_path).read_bytes())

    def publish(self) -> Manifest:
        self._record_times()
        self.manifest = Manifest(self.stage, self.key, self.files, self.meta, time.time())
        self.storage.write_bytes(f"{self.rel}/{MANIFEST}", self.manifest.to_json())
        return self.manifest
