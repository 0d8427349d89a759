"""The :class:`Tracker`: one parent MLflow run per job or sweep, nested children, degraded mode."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from persrep.redaction import redact_text, redact_value, secret_env_values
from persrep.tracking.safe_copy import _stage_safe_copy
from persrep.tracking.store import (MAX_TAG_VALUE, METRICS_PER_BATCH, PARAMS_PER_BATCH, PARENT_TAG,
                                    _flatten, _is_locked, _sqlite_path, _truncate, mlflow_key,
                                    mlflow_param_value, resolve_tracking_uri)
from persrep.errors import TrackingError  # noqa: F401 (re-exported)

log = logging.getLogger("persrep.tracking")


# ---------------------------------------------------------------------------------------------
class Tracker:
    """MLflow tracking for one job or sweep, driven from the driver process.

    ``Tracker(settings.tracking, settings.storage.root)``; call :meth:`connect` before compute
    (raises :class:`TrackingError` when required and unavailable), then :meth:`start_parent`,
    :meth:`child_run` per trial/instance, :meth:`log_metrics`/:meth:`log_artifact`, and
    :meth:`end` (or use it as a context manager). When disabled or degraded every method is a
    no-op returning ``None``, so callers never branch on tracking.
    """

    LOCK_RETRIES = 8

    def __init__(self, tracking: Any = None, storage_root: str | None = None, *,
                 say: Callable[[str], None] | None = None, probe_timeout: float = 3.0):
        from persrep.config import TrackingSettings

        self.settings = tracking if tracking is not None else TrackingSettings()
        self.storage_root = storage_root
        self.enabled = bool(self.settings.enabled)
        self.required = bool(self.settings.required)
        self.experiment_name = self.settings.experiment
        self.uri, self.note = resolve_tracking_uri(self.settings.uri, storage_root)
        self.degraded = False
        self.warning: str | None = None
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self.probe_timeout = probe_timeout
        self._say = say or log.warning
        self._client: Any = None
        self._connected = False

    @classmethod
    def from_settings(cls, settings: Any, **kwargs: Any) -> "Tracker":
        return cls(settings.tracking, settings.storage.root, **kwargs)

    # -- state --------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """True when calls really log (enabled, connected, not degraded)."""
        return self.enabled and not self.degraded and self._client is not None

    @property
    def safe_uri(self) -> str:
        return redact_text(self.uri)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_client"] = None
        state["_say"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._say = log.warning
        if self._connected and not self.degraded and self.enabled:
            self._connected = False  # reconnect lazily in this process

    # -- connection ----------------------------------------------------------------------
    def _fail(self, why: str, fix: str) -> None:
        line = (f"tracking unavailable at {self.safe_uri}: {redact_text(why)}; {fix}")
        if self.required:
            raise TrackingError(line + " (tracking.required=true, so the job stops before compute)")
        self.degraded = True
        self.warning = line + "; the job goes on without tracking (degraded)"
        self._say(self.warning)

    def _probe_http(self) -> str | None:
        """None when an HTTP server answers at the URI, else the reason it did not."""
        import requests

        try:
            requests.get(self.uri.rstrip("/") + "/health", timeout=self.probe_timeout)
            return None
        except requests.Timeout:
            return f"no answer within {self.probe_timeout:g} s"
        except requests.RequestException as exc:
            text = str(exc).lower()
            what = ("connection refused" if "refused" in text else
                    "host not found" if "name or service" in text or "resolve" in text else
                    type(exc).__name__)
            return f"no MLflow server answers ({what})"

    def connect(self) -> "Tracker":
        """Reach the store and get/create the experiment (idempotent). Call before compute."""
        if not self.enabled or self._connected:
            return self
        self._connected = True
        if self.note:
            self._say(self.note)
        scheme = urlparse(self.uri).scheme.lower()
        if scheme in ("http", "https"):
            why = self._probe_http()
            if why:
                self._fail(why, "start the server (`mlflow server --backend-store-uri "
                           "sqlite:///mlflow.db --port 5000`), fix tracking.uri / "
                           "$MLFLOW_TRACKING_URI, or set tracking.enabled=false")
                return self
        elif (scheme == "file" or (scheme == "" and ("/" in self.uri or self.uri.startswith(".")))) \
                and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
            self._fail("mlflow 3.17 refuses a file store",
                       "use tracking.uri=sqlite:///<dir>/mlflow.db (or set MLFLOW_ALLOW_FILE_STORE=true)")
            return self
        db = _sqlite_path(self.uri)
        artifact_location = None
        if db is not None:
            try:
                db.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                self._fail(f"cannot create {db.parent}: {exc.strerror}",
                           "set tracking.uri=sqlite:///<writable dir>/mlflow.db")
                return self
            artifact_location = (db.parent.resolve() / "mlartifacts").as_uri()
        try:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
            exp = self._call(self._client.get_experiment_by_name, self.experiment_name)
            if exp is None:
                try:
                    self.experiment_id = self._call(self._client.create_experiment,
                                                    self.experiment_name,
                                                    artifact_location=artifact_location)
                except Exception:  # noqa: BLE001 - created concurrently by another driver
                    exp = self._call(self._client.get_experiment_by_name, self.experiment_name)
                    if exp is None:
                        raise
                    self.experiment_id = exp.experiment_id
            else:
                if exp.lifecycle_stage == "deleted":
                    self._call(self._client.restore_experiment, exp.experiment_id)
                self.experiment_id = exp.experiment_id
        except TrackingError:
            raise
        except Exception as exc:  # noqa: BLE001
            self._client = None
            self._fail(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}",
                       "check tracking.uri (e.g. sqlite:///<dir>/mlflow.db or http://host:5000) "
                       "or set tracking.enabled=false")
        return self

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call the MLflow client, retrying briefly while SQLite says 'database is locked'."""
        delay = 0.1
        for attempt in range(self.LOCK_RETRIES):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001
                if not _is_locked(exc) or attempt == self.LOCK_RETRIES - 1:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        return None  # pragma: no cover

    def _guard(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a logging call; a failure mid-job degrades tracking instead of killing the job."""
        if not self.enabled or self.degraded:
            return None
        if not self._connected:
            self.connect()
        if not self.active:
            return None
        try:
            return self._call(fn, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            if getattr(exc, "error_code", None) == "INVALID_PARAMETER_VALUE":
                # one bad value (e.g. a param re-logged with another value): skip it, keep tracking
                self._say(f"tracking: could not {what}: {redact_text(str(exc)).splitlines()[0][:200]}")
                return None
            if self.required:
                raise TrackingError(f"tracking at {self.safe_uri} failed to {what}: "
                                    f"{redact_text(str(exc))[:300]}") from None
            self.degraded = True
            first = redact_text(str(exc)).splitlines()[0][:200] if str(exc) else ""
            self.warning = (f"tracking at {self.safe_uri} failed to {what} "
                            f"({type(exc).__name__}: {first}); the job goes on without tracking "
                            "(degraded)")
            self._say(self.warning)
            return None

    # -- runs ----------------------------------------------------------------------------
    def start_parent(self, run_name: str, settings: Any = None,
                     tags: Mapping[str, Any] | None = None) -> str | None:
        """Create THE parent run of this job/sweep (once); log flattened settings as params,
        and the full redacted settings as ``settings.json``. Returns its run id (None if off)."""
        if self.parent_run_id is not None:
            return self.parent_run_id
        all_tags = {"persrep.kind": "job", "persrep.storage_root": self.storage_root or "-"}
        all_tags.update(tags or {})
        run_id = self._create_run(run_name, all_tags)
        if run_id is None:
            return None
        self.parent_run_id = run_id
        if settings is not None:
            self.log_params(_flatten(settings), run_id=run_id)
            from persrep.config import settings_to_dict

            self.log_text(json.dumps(settings_to_dict(settings), indent=1, default=str),
                          "settings.json", run_id=run_id)
        return run_id

    def _create_run(self, name: str, tags: Mapping[str, Any]) -> str | None:
        env_values = secret_env_values()
        safe = {mlflow_key(k): _truncate(str(redact_value(k, v, env_values)), MAX_TAG_VALUE)
                for k, v in tags.items() if v is not None}
        run = self._guard("create run", lambda: self._client.create_run(
            self.experiment_id, tags=safe, run_name=redact_text(name)[:250]))
        return run.info.run_id if run is not None else None

    def child_run(self, name: str, params: Mapping[str, Any] | Any = None,
                  metrics: Mapping[str, float] | None = None,
                  artifacts: Iterable[str | Path] | Mapping[str, str | Path] | None = None, *,
                  tags: Mapping[str, Any] | None = None,
                  references: Mapping[str, str] | None = None,
                  status: str = "FINISHED") -> str | None:
        """One finished child run under the parent: params (nested dicts/settings are flattened),
        metrics, artifacts (paths, or ``{artifact_subdir: path}``), references (name -> URI,
        logged as ``persrep.ref.<name>`` tags, never the bytes). Returns its run id."""
        if self.parent_run_id is None:
            self.start_parent("persrep")
        if self.parent_run_id is None:
            return None
        all_tags = {PARENT_TAG: self.parent_run_id, "persrep.kind": "child"}
        all_tags.update(tags or {})
        run_id = self._create_run(name, all_tags)
        if run_id is None:
            return None
        if params:
            self.log_params(params if isinstance(params, Mapping) and all(
                not isinstance(v, Mapping) for v in params.values()) else _flatten(params),
                run_id=run_id)
        if metrics:
            self.log_metrics(metrics, run_id=run_id)
        for ref_name, uri in (references or {}).items():
            self.log_reference(ref_name, uri, run_id=run_id)
        if isinstance(artifacts, Mapping):
            for sub, path in artifacts.items():
                self.log_artifact(path, sub or None, run_id=run_id)
        else:
            for path in artifacts or ():
                self.log_artifact(path, run_id=run_id)
        self._guard("end run", lambda: self._client.set_terminated(run_id, status))
        return run_id

    def parent_run_tags(self) -> dict[str, str]:
        """Tags that nest other runs under the parent (Ray Tune ``MLflowLoggerCallback(tags=...)``)."""
        return {PARENT_TAG: self.parent_run_id} if self.parent_run_id and self.active else {}

    def tune_callback_kwargs(self) -> dict[str, Any] | None:
        """Keyword arguments for ``ray.air.integrations.mlflow.MLflowLoggerCallback``, or None when
        tracking is off/degraded (then add no callback). Start the parent run first."""
        if not self.active or self.parent_run_id is None:
            return None
        return {"tracking_uri": self.uri, "experiment_name": self.experiment_name,
                "tags": self.parent_run_tags(), "save_artifact": False}

    def end(self, status: str = "FINISHED") -> None:
        """Terminate the parent run (FINISHED, FAILED or KILLED)."""
        if self.parent_run_id is not None and self.active:
            rid = self.parent_run_id
            self._guard("end the parent run", lambda: self._client.set_terminated(rid, status))

    def __enter__(self) -> "Tracker":
        return self.connect()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.end("FAILED" if exc_type is not None else "FINISHED")

    @contextmanager
    def parent(self, run_name: str, settings: Any = None, tags: Mapping[str, Any] | None = None):
        """``with tracker.parent("job", settings) as run_id:`` -> ends FAILED on an exception."""
        self.connect()
        run_id = self.start_parent(run_name, settings, tags)
        try:
            yield run_id
        except BaseException:
            self.end("FAILED")
            raise
        self.end("FINISHED")

    # -- logging -------------------------------------------------------------------------
    def _rid(self, run_id: str | None) -> str | None:
        return run_id or self.parent_run_id

    def log_params(self, params: Mapping[str, Any], run_id: str | None = None) -> None:
        """Params, redacted, keys sanitised (<=250), values truncated to MLflow's 6000 chars."""
        rid = self._rid(run_id)
        if rid is None or not self.active:
            return
        from mlflow.entities import Param

        env_values = secret_env_values()
        items = [Param(mlflow_key(k), mlflow_param_value(redact_value(k, v, env_values)))
                 for k, v in params.items()]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            chunk = items[i:i + PARAMS_PER_BATCH]
            self._guard("log params", lambda c=chunk: self._client.log_batch(rid, params=c))

    def set_tags(self, tags: Mapping[str, Any], run_id: str | None = None) -> None:
        rid = self._rid(run_id)
        if rid is None or not self.active:
            return
        from mlflow.entities import RunTag

        env_values = secret_env_values()
        items = [RunTag(mlflow_key(k), _truncate(str(redact_value(k, v, env_values)), MAX_TAG_VALUE))
                 for k, v in tags.items() if v is not None]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            chunk = items[i:i + PARAMS_PER_BATCH]
            self._guard("set tags", lambda c=chunk: self._client.log_batch(rid, tags=c))

    def log_reference(self, name: str, uri: str, run_id: str | None = None) -> None:
        """A large output (adapter, shard set) by reference: its storage URI as a tag."""
        self.set_tags({f"persrep.ref.{name}": uri}, run_id=run_id)

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0,
                    run_id: str | None = None) -> None:
        """Numeric metrics (None skipped); names sanitised (``recall@1`` -> ``recall_at_1``)."""
        rid = self._rid(run_id)
        if rid is None or not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = []
        for k, v in metrics.items():
            if v is None or isinstance(v, bool):
                continue
            try:
                f = float(v)
            except (TypeError, ValueError):
                continue
            items.append(Metric(mlflow_key(k), f, now, step))
        for i in range(0, len(items), METRICS_PER_BATCH):
            chunk = items[i:i + METRICS_PER_BATCH]
            self._guard("log metrics", lambda c=chunk: self._client.log_batch(rid, metrics=c))

    def log_text(self, text: str, artifact_file: str, run_id: str | None = None) -> None:
        rid = self._rid(run_id)
        if rid is None or not self.active:
            return
        with tempfile.TemporaryDirectory(prefix="persrep-track-") as tmp:
            path = Path(tmp) / Path(artifact_file).name
            path.write_text(text)
            sub = str(Path(artifact_file).parent)
            self.log_artifact(path, None if sub in ("", ".") else sub, run_id=rid)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None,
                     run_id: str | None = None) -> None:
        """Upload a file or directory. Text files are uploaded redacted; a binary file holding a
        secret environment value is skipped with a warning."""
        rid = self._rid(run_id)
        if rid is None or not self.active:
            return
        src = Path(path)
        if not src.exists():
            self._say(f"tracking: artifact {src} does not exist; not logged")
            return
        with tempfile.TemporaryDirectory(prefix="persrep-track-") as tmp:
            staged = Path(tmp) / src.name
            files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
            env_values = secret_env_values()
            for f in files:
                dest = staged if src.is_file() else staged / f.relative_to(src)
                dest.parent.mkdir(parents=True, exist_ok=True)
                if not _stage_safe_copy(f, dest, env_values):
                    self._say(f"tracking: {f.name} contains a secret value from the environment; "
                              "not logged")
            if src.is_file():
                if staged.exists():
                    self._guard("log an artifact", lambda: self._client.log_artifact(
                        rid, str(staged), artifact_path))
            elif staged.exists():
                sub = artifact_path if artifact_path is not None else src.name
                self._guard("log artifacts", lambda: self._client.log_artifacts(rid, str(staged), sub))

    def log_table(self, frame: Any, name: str, run_id: str | None = None) -> None:
        """A result table as ``<name>.parquet`` + ``<name>.csv`` (viewable in the MLflow UI)."""
        if not self.active:
            return
        with tempfile.TemporaryDirectory(prefix="persrep-track-") as tmp:
            d = Path(tmp) / "tables"
            d.mkdir()
            frame.to_parquet(d / f"{name}.parquet", index=False)
            frame.to_csv(d / f"{name}.csv", index=False)
            self.log_artifact(d / f"{name}.parquet", "tables", run_id=run_id)
            self.log_artifact(d / f"{name}.csv", "tables", run_id=run_id)

    def log_results(self, frame: Any, run_id: str | None = None) -> dict[str, float]:
        """Headline means over instances as metrics on the parent:
        ``<model>/<backbone>/<data_config>/<task>_<metric>`` (scene "all", status ok)."""
        from persrep.evaluation.aggregate import HEADLINE

        if frame is None or len(frame) == 0:
            return {}
        ok = frame[(frame["status"] == "ok") & (frame["scene"] == "all")]
        ok = ok[[HEADLINE.get(t) == m for t, m in zip(ok["task"], ok["metric"])]]
        out: dict[str, float] = {}
        for (model, bb, dc, task, metric), grp in ok.groupby(
                ["model", "backbone", "data_config", "task", "metric"], sort=True, dropna=False):
            value = float(grp["value"].mean())
            if math.isfinite(value):
                out[f"{model}/{bb}/{dc}/{task}_{metric}"] = value
        self.log_metrics(out, run_id=run_id)
        return out

    def log_run_dir(self, run_dir: str | Path, run_id: str | None = None) -> None:
        """The files of a finished local run directory (results, summary, settings, report)."""
        d = Path(run_dir)
        for name in ("results.parquet", "summary.json", "summary.md", "settings.yaml"):
            if (d / name).is_file():
                self.log_artifact(d / name, run_id=run_id)
        if (d / "report").is_dir():
            self.log_artifact(d / "report", "report", run_id=run_id)

