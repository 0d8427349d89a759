"""One job at a time per storage root: a lock file naming its owner's host and PID.

``run_all`` / ``persrep run`` / a sweep take ``<root>/.lock/job.json`` after the pre-flight and
before any compute, and delete it when they end (also on Ctrl-C / SIGTERM). A second job on the
same root is refused in one line (exit 2) naming the owner: host, PID, run id, since when. A lock
is **stale**, and taken over with a message, when
* its owner ran on this host and that PID is gone (or is another process: its start time differs), or
* its owner ran on another host and its heartbeat (rewritten every ``HEARTBEAT_S``) is older than
  ``STALE_S`` (the owner cannot be asked from here).
Creating the lock is atomic: a hard link of a finished temp file (local), or a PUT with
``If-None-Match: *`` (S3 conditional write, also honoured by moto), so of two jobs starting at the
same moment exactly one gets it. Taking over a stale lock first moves it aside (local: rename,
which only one taker can do; S3: a conditional DELETE on its ETag), then creates a fresh one.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any, Callable

from persrep.storage import Storage, StorageError

LOCK = ".lock/job.json"
HEARTBEAT_S = 30.0
STALE_S = 300.0


_HELD: set[str] = set()  # tokens of the locks this process holds now


class RunLockError(StorageError):
    """The storage root is in use by another job."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (PID-reuse proof), None when gone."""
    try:
        stat = open(f"/proc/{pid}/stat").read()  # noqa: SIM115
    except OSError:
        return None
    return stat[stat.rfind(")") + 2:].split()[19]


def _pid_alive(pid: int, started: str | None) -> bool:
    now = _start_time(pid)
    if now is None:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True  # no /proc: trust kill(0)
    return started is None or now == started


class RunLock:
    """``with RunLock(storage, run_id, say):`` holds the root's lock for the block."""

    SETTLE_S = 0.3

    def __init__(self, storage: Storage, run_id: str, say: Callable[[str], None] | None = None,
                 command: str = "run_all", heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S):
        self.storage, self.run_id, self.say = storage, run_id, say or (lambda _m: None)
        self.command, self.heartbeat_s, self.stale_s = command, heartbeat_s, stale_s
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the record -------------------------------------------------------------------------
    def _record(self) -> dict[str, Any]:
        pid = os.getpid()
        return {"host": socket.gethostname(), "pid": pid, "pid_start": _start_time(pid),
                "run_id": self.run_id, "command": self.command, "token": self.token,
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "heartbeat": time.time()}

    def _read(self) -> tuple[dict[str, Any] | None, str | None]:
        """The current lock record and its version (ETag / inode+mtime), or (None, None)."""
        if self.storage.is_s3:
            import botocore.exceptions

            try:
                obj = self._s3().get_object(Bucket=self.storage.bucket, Key=self._key())
            except botocore.exceptions.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None, None
                raise
            body, version = obj["Body"].read(), obj["ETag"]
        else:
            path = self.storage.path(LOCK)
            try:
                with open(path, "rb") as f:
                    body = f.read()
                st = os.stat(path)
            except FileNotFoundError:
                return None, None
            version = f"{st.st_ino}:{st.st_mtime_ns}"
        try:
            rec = json.loads(body)
        except ValueError:
            rec = {}  # torn or foreign: treated as stale by age below
        return (rec if isinstance(rec, dict) else {}), version

    def _key(self) -> str:
        return self.storage.path(LOCK).split("/", 1)[1]

    def _s3(self):
        import boto3

        endpoint = self.storage.s3_endpoint or os.environ.get("AWS_ENDPOINT_URL")
        return boto3.client("s3", endpoint_url=endpoint)

    def _create(self, rec: dict[str, Any]) -> bool:
        """Create the lock if there is none; True when this call created it."""
        data = json.dumps(rec, indent=1).encode()
        if self.storage.is_s3:
            import botocore.exceptions

            try:
                self._s3().put_object(Bucket=self.storage.bucket, Key=self._key(), Body=data, IfNoneMatch="*")
            except botocore.exceptions.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412",
                                                                   "ConditionalRequestConflict"):
                    return False
                raise
            # S3 makes the conditional PUT atomic; a server that checks then writes (moto) may
            # let two through: read back after a moment, the last writer's token is the owner
            time.sleep(self.SETTLE_S)
            rec, _ = self._read()
            return bool(rec) and rec.get("token") == self.token
        path = self.storage.path(LOCK)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{self.token}"
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, path)  # atomic: fails when the lock exists
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def _remove(self, version: str | None) -> bool:
        """Remove the lock if it is still at ``version`` (a stale one) / ours; True when removed."""
        if self.storage.is_s3:
            import botocore.exceptions

            try:
                self._s3().delete_object(Bucket=self.storage.bucket, Key=self._key(), IfMatch=version)
                return True
            except botocore.exceptions.ClientError:
                return False
        path = self.storage.path(LOCK)
        aside = f"{path}.stale-{self.token}"
        try:
            os.rename(path, aside)  # only one taker can move it
        except FileNotFoundError:
            return False
        os.unlink(aside)
        return True

    # -- staleness ---------------------------------------------------------------------------
    def stale_reason(self, rec: dict[str, Any]) -> str | None:
        """Why the lock ``rec`` is stale, or None when its owner may still be running."""
        if not rec.get("host") or not isinstance(rec.get("pid"), int):
            return "the lock file is unreadable"
        if rec["host"] == socket.gethostname():
            if not _pid_alive(rec["pid"], rec.get("pid_start")):
                return f"no process {rec['pid']} on this host"
            if rec["pid"] == os.getpid() and rec.get("token") not in _HELD:
                # an earlier job of this process could not delete it (storage down at its end)
                return "left by an earlier job of this process"
            return None
        age = time.time() - float(rec.get("heartbeat") or 0)
        if age > self.stale_s:
            return f"no heartbeat from host {rec['host']} for {age:.0f} s (> {self.stale_s:.0f} s)"
        return None

    def describe(self, rec: dict[str, Any]) -> str:
        return (f"{rec.get('command', 'a job')} (run {rec.get('run_id')}) on host {rec.get('host')}, "
                f"pid {rec.get('pid')}, since {rec.get('since')}")

    # -- acquire / release ------------------------------------------------------------------
    def acquire(self) -> None:
        try:
            self._acquire()
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - endpoint down, permissions: one line, exit 2
            raise self.storage._error(exc, f"cannot take the lock {self.storage.uri(LOCK)}") from None

    def _acquire(self) -> None:
        where = self.storage.uri(LOCK)
        for _ in range(5):
            if self._create(self._record()):
                _HELD.add(self.token)
                self._start_heartbeat()
                return
            rec, version = self._read()
            if rec is None:
                continue  # released meanwhile: try again
            why = self.stale_reason(rec)
            if why is None:
                raise RunLockError(
                    f"storage root {self.storage.root} is in use by {self.describe(rec)}: wait for it "
                    f"to finish or use another storage root (if that job is gone, delete {where})")
            if self._remove(version):
                self.say(f"lock: took over a stale lock of {self.describe(rec)}: {why}")
        raise RunLockError(f"could not take the lock {where}: other jobs keep taking it; try again")

    def _start_heartbeat(self) -> None:
        def beat():
            while not self._stop.wait(self.heartbeat_s):
                rec, _ = self._read()
                if not rec or rec.get("token") != self.token:
                    return  # taken over (we were thought dead): nothing to refresh
                rec["heartbeat"] = time.time()
                try:
                    self.storage.write_bytes(LOCK, json.dumps(rec, indent=1).encode())
                except StorageError:
                    pass  # storage briefly down: the next beat tries again

        self._thread = threading.Thread(target=beat, name="persrep-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        _HELD.discard(self.token)
        try:
            rec, version = self._read()
            if rec and rec.get("token") == self.token:
                self._remove(version)
        except Exception:  # noqa: BLE001 - storage down at exit: the next job finds it stale
            pass

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
