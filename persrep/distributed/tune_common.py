"""What every Ray Tune launch of the project shares: where Tune keeps its state, how a failed
trial's error reads in one line, and the MLflow callback that nests trials under a parent run.

Used by the personalisation stage (``tune_stage.py``), its data-parallel trials
(``data_parallel.py``) and sweeps (``sweep.py``): one body each, so the two Tune paths cannot
drift apart (and ``data_parallel`` no longer imports ``tune_stage``, which imports it).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from persrep.pipeline.executor import short_error


def tune_storage(ctx: Any, local: str = ".scratch/tune", remote: str = ".tune") -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Tune's experiment state and checkpoints: ``<root>/
    <local>`` for a local storage root (created), ``<root>/<remote>`` on the root's filesystem
    for ``s3://``. The personalisation stage keeps the defaults; sweeps use ``sweeps`` for both."""
    if ctx.storage.is_s3:
        return f"{ctx.storage.base}/{remote}", ctx.storage.fs
    path = Path(ctx.storage.base) / local
    path.mkdir(parents=True, exist_ok=True)
    return str(path), None


def root_cause(exc: BaseException) -> str:
    """``Type: message`` of the user's exception inside a Ray wrapper (``RayTaskError``, a dead
    actor, a Tune trial's error): its cause when it carries one, else the wrapper's last line."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    text = short_error(exc)
    if type(exc).__name__.startswith("RayTaskError"):  # not unpicklable to its cause: its last line names it
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        text = (lines[-1] if lines else text)[:300]
    return text


def mlflow_callback(mlflow: Mapping[str, Any], tags: Mapping[str, str] | None = None) -> Any:
    """An ``MLflowLoggerCallback`` from keyword arguments (``Tracker.tune_callback_kwargs()``),
    with ``tags`` added to its own (e.g. ``mlflow.parentRunId``: each trial nests under it)."""
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    kwargs = dict(mlflow)
    kwargs["tags"] = {**(kwargs.get("tags") or {}), **(tags or {})}
    return MLflowLoggerCallback(**kwargs)
