"""Where the MLflow store is and what it accepts: URI resolution, key/value limits, lock detection."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from persrep.redaction import redact_text

MAX_KEY = 250          # mlflow.utils.validation.MAX_ENTITY_KEY_LENGTH (3.17)
MAX_PARAM_VALUE = 6000  # MAX_PARAM_VAL_LENGTH
MAX_TAG_VALUE = 8000    # MAX_TAG_VAL_LENGTH
PARAMS_PER_BATCH = 100  # MAX_PARAMS_TAGS_PER_BATCH
METRICS_PER_BATCH = 1000
PARENT_TAG = "mlflow.parentRunId"


# ---------------------------------------------------------------------------------------------
# MLflow limits
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")


def mlflow_key(key: str) -> str:
    """A valid MLflow param/metric/tag key: bad characters replaced, <= 250 chars, still unique."""
    k = str(key).replace("@", "_at_").replace("+", "_plus_")
    k = _BAD_KEY_CHARS.sub("_", k)
    k = re.sub(r"/+", "/", k).strip("/") or "_"
    k = "/".join(p if p not in (".", "..") else "_" for p in k.split("/"))
    if len(k) > MAX_KEY:
        from persrep.hashing import sha256_hex

        k = k[: MAX_KEY - 9] + "-" + sha256_hex(str(key), 8)
    return k


def _truncate(s: str, limit: int) -> str:
    if len(s) <= limit:
        return s
    marker = f"...[truncated {len(s) - limit + 40} chars]"
    return s[: limit - len(marker)] + marker


def mlflow_param_value(value: Any, limit: int = MAX_PARAM_VALUE) -> str:
    if isinstance(value, (dict, list, tuple)):
        value = json.dumps(value, default=str)
    return _truncate("None" if value is None else str(value), limit)


def _flatten(params: Mapping[str, Any] | Any) -> dict[str, Any]:
    from persrep.config import flatten

    return flatten(params) if params is not None else {}


# ---------------------------------------------------------------------------------------------
# URI resolution
def resolve_tracking_uri(uri: str | None, storage_root: str | None) -> tuple[str, str | None]:
    """(tracking URI, a note to show the user or None).

    ``uri`` wins, then ``$MLFLOW_TRACKING_URI``, then ``sqlite:///<storage root>/mlflow.db``.
    A relative SQLite path (``sqlite:///mlflow.db``) is made absolute here, on the driver, against
    the directory the job was started in: every process that opens the store (the tracker, Tune's
    MLflow callback, a worker elsewhere) then agrees on one file. An ``s3://`` storage root cannot hold SQLite: then ``~/.persrep/mlflow.db`` (or ./mlflow.db
    when the home directory is not writable) is used, and the note says so.
    """
    if uri:
        return _absolute_sqlite(uri), None
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return _absolute_sqlite(env), None
    root = storage_root or "runs/local"
    parsed = urlparse(root)
    if parsed.scheme in ("", "file"):
        base = Path(parsed.path if parsed.scheme == "file" else root).expanduser().absolute()
        return f"sqlite:///{base / 'mlflow.db'}", None
    home = Path("~/.persrep").expanduser()
    try:
        home.mkdir(parents=True, exist_ok=True)
        base = home
    except OSError:
        base = Path.cwd()
    return (f"sqlite:///{base / 'mlflow.db'}",
            f"tracking: storage root {redact_text(root)} is remote and tracking.uri is unset; "
            f"using a local SQLite store {base / 'mlflow.db'} (set tracking.uri=http://<mlflow "
            "server> to share runs across machines)")


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///rel.db`` / ``sqlite:////abs.db`` URI (None otherwise)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def _absolute_sqlite(uri: str) -> str:
    """``sqlite:///rel.db[?q]`` -> ``sqlite:////<cwd>/rel.db[?q]``; every other URI unchanged."""
    path = _sqlite_path(uri)
    if path is None or path.is_absolute():
        return uri
    query = uri.split("?", 1)[1] if "?" in uri else None
    return f"sqlite:///{path.expanduser().absolute()}" + (f"?{query}" if query is not None else "")


def _is_locked(exc: BaseException) -> bool:
    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 5:
        if "database is locked" in str(e):
            return True
        e = e.__cause__ or e.__context__
        seen += 1
    return False



@contextmanager
def tracking_env_restored() -> Iterator[None]:
    """Put ``$MLFLOW_TRACKING_URI`` back as it was on exit.

    ``mlflow.set_tracking_uri`` (which Ray Tune's ``MLflowLoggerCallback`` calls on the driver)
    also sets the variable for the whole process, so a later job in the same process (tests, a
    notebook) would silently log into this job's store instead of resolving its own.
    """
    before = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before
