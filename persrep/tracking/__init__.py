"""MLflow tracking: one parent run per job or sweep, a nested child per trial/instance, no secrets.

A :class:`Tracker` lives on the driver. It resolves the tracking URI (``tracking.uri``, else
``$MLFLOW_TRACKING_URI``, else ``sqlite:///<storage root>/mlflow.db``), creates the experiment
and ONE parent run, and logs children with the ``mlflow.parentRunId`` tag (how the MLflow UI
nests runs). Ray Tune's ``MLflowLoggerCallback`` gets the same tag from :meth:`parent_run_tags`,
so its per-trial runs nest under the same parent; workers never open the SQLite store
themselves (SQLite locks under many writers: ../shared/docs/ENVIRONMENT.md, not in this
repository).

Nothing secret reaches MLflow: every param, tag and text artifact goes through
:mod:`persrep.redaction` (keys like ``*secret*``/``*token*``/``*password*``, URL user-info, AWS
key shapes, the values of secret-named environment variables). Binary artifacts that contain a
secret environment value are not uploaded at all. Adapters and other large outputs are logged
*by reference* (their storage URI as a tag), never as bytes.

If the server cannot be reached the job goes on: the tracker turns ``degraded`` and says so in
ONE warning line naming the URI and the fix; with ``tracking.required=true`` it raises
:class:`TrackingError` instead, from :meth:`Tracker.connect`, which the orchestrator calls
before any compute. ``mlflow`` is imported lazily (~2 s).
"""

from __future__ import annotations

__all__ = ["Tracker", "TrackingError", "resolve_tracking_uri", "mlflow_key", "mlflow_param_value"]

from persrep.tracking.store import mlflow_key, mlflow_param_value, resolve_tracking_uri  # noqa: E402
from persrep.tracking.tracker import Tracker, TrackingError  # noqa: E402
