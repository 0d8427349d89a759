"""Stage 3 (personalisation) on Ray Tune: one trial per unit, retries, checkpoints, progress.

:class:`PersonalizationStage` runs the stage; :class:`TunePersonalization` is the stage runner
``RayExecutor`` declares for it:

* units whose adapter is already published are skipped up front (no trial, no actor);
* every remaining unit becomes one trial of a *function trainable* (``tune.with_resources``:
  ``resources.gpus_per_trial`` GPUs when the cluster has GPUs, else
  ``resources.cpus_per_trial`` CPUs, which may be fractional), at most
  ``resources.max_concurrent_trials`` at a time;
* inside the trial the library's unit function (:func:`persrep.pipeline.stages.personalization.run_personalize_unit`,
  which skips or publishes atomically) trains the adapter; every step is reported with
  ``ray.tune.report`` (``loss``, ``triplet_accuracy``, ``step``) and every training checkpoint
  that ``train_one_instance`` writes is surfaced as a ``ray.tune.Checkpoint``;
* a trial that raises or whose worker dies is retried up to ``max_retries`` times, unless the
  retry policy (``persrep.pipeline.retry``) says the same inputs raise it again: then the trial
  reports its failure as its result and is not restarted;
* retries go through ``FailureConfig``; the retried trial gets its last ``ray.tune.Checkpoint`` and copies it into
  the unit's scratch work dir when it is newer than what that dir holds, so it resumes where the
  failed attempt stopped even on another node (the scratch dir is node-local when the storage
  root is ``s3://``); ``train_one_instance``'s per-step seeding makes the resumed adapter equal
  an uninterrupted run's;
* the experiment's name is a content key of the stage's units, so relaunching the job with the
  same units restores the same experiment (``Tuner.restore``: unfinished and errored trials
  resume from their checkpoints);
* the result is one :class:`Outcome` per unit, in the order given (done / skipped / failed, the
  error, ``attempts`` = failures + 1), exactly what the runner's summary counts.

Tune's own files (experiment state, trial checkpoints) live under ``<root>/.scratch/tune`` for a
local storage root, ``<root>/.tune`` for an ``s3://`` root. On a multi-node cluster the Tune
storage path must be reachable from every node (an ``s3://`` root, or a local root on a shared
file system), otherwise a retry on another node cannot read the checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import tune

from persrep.config import content_key
from persrep.contrastive.train import CHECKPOINT
from persrep.distributed.session import cluster_gpus
from persrep.distributed.tune_common import mlflow_callback, root_cause, tune_storage
from persrep.pipeline.executor import Outcome, StageJob, StageRunner
from persrep.pipeline.instance_data import scratch_dir
from persrep.pipeline.progress import Progress, as_progress
from persrep.pipeline.resource_plan import ResourcePlan
from persrep.pipeline.retry import POLICY
from persrep.pipeline.stages.personalization import PersonalizeUnit
from persrep.pipeline.units import ADAPTERS
from persrep.tracking.store import tracking_env_restored

STAGE = "personalization"
StepHook = Callable[[PersonalizeUnit, dict[str, Any]], None]
UnitFn = Callable[[Any, PersonalizeUnit, Callable[[dict[str, Any]], None]], dict[str, Any]]


# -- names, storage, resources ------------------------------------------------------------------
def unit_label(u: PersonalizeUnit) -> str:
    """The label the runner uses for a personalisation unit (summary, MLflow run names)."""
    return u.label


def experiment_name(units: Sequence[PersonalizeUnit]) -> str:
    """Stable across relaunches of the same stage: a content key of the units' keys."""
    return "personalize-" + content_key(sorted({u.key for u in units}))


def trial_resources(settings: Any, gpus_in_cluster: float | None = None,
                    data_parallel_workers: int = 0, memory_bytes: int = 0) -> dict[str, float]:
    """Resources of one trial: GPUs when the cluster has them, else (fractional) CPUs, and the
    host memory the run's plan reserves for a trial (persrep.pipeline.memory).

    A data-parallel trial only drives a ``TorchTrainer`` (whose workers reserve their own
    resources), so it asks for a sliver of a CPU.
    """
    res = settings.resources
    if data_parallel_workers > 1:
        return {"cpu": 0.01}
    memory = {"memory": float(memory_bytes)} if memory_bytes > 0 else {}
    gpus = cluster_gpus() if gpus_in_cluster is None else gpus_in_cluster
    per_trial = res.tune_trial_gpus
    if per_trial > 0 and gpus > 0:
        return {"cpu": res.cpus_per_trial, "gpu": min(per_trial, gpus), **memory}
    return {"cpu": res.cpus_per_trial, **memory}


def trial_checkpoint_config(settings: Any) -> Any:
    """How many Tune checkpoints a trial keeps (``resources.tune_checkpoints_to_keep``).

    Default None: Tune never *forces* an experiment-state snapshot. With ``num_to_keep=k`` Tune
    forces one (an upload of the whole experiment state, which lists every trial) each time a
    trial has checkpointed k times since the last one; with hundreds of trials that each write a
    few training checkpoints, snapshots then follow every trial and their total size grows with
    trials^2 (``bench/scale.py``, docs/SCALING.md). Unforced snapshots stay on Tune's automatic
    period (at most ~5 % of the driver's time). A trial's checkpoints are its few LoRA training
    checkpoints (``personalization.checkpoint_every``); the published adapter supersedes them.
    """
    return tune.CheckpointConfig(num_to_keep=settings.resources.tune_checkpoints_to_keep)


def _dirname(label: str, key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", label)[:80] + "-" + key[:8]


class _TrialNamer:
    """Trial names = unit labels (the MLflow run names).

    Tune pickles the namer into *every* trial's entry of the experiment state, so it holds only
    the stage's token and finds the labels in this driver's state (as :class:`StageCallback`
    does): carrying the labels dict made each trial's entry O(trials) and the experiment state
    O(trials^2) (bench/scale.py: 5.4 KB of labels per trial at 20 trials).
    """

    def __init__(self, token: str, dirs: bool = False):
        self.token = token
        self.dirs = dirs

    def __call__(self, trial: Any) -> str:
        key = trial.config["unit"]
        state = _STATES.get(self.token)
        label = state.labels.get(key, key) if state is not None else key
        return _dirname(label, key) if self.dirs else label


@contextmanager
def without_trial_loggers():
    """Tune's default per-trial CSV / JSON / TensorBoard loggers off while the stage runs.

    Nothing reads them (outcomes come from the driver callback and the final report); each is a
    file per trial written on every result and uploaded with the experiment: on s3 about half of
    the stage's requests at 20 trials (bench/scale.py). Scoped: sweeps keep theirs.
    """
    saved = os.environ.get("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS")
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", None)
        else:
            os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = saved


# -- inside a trial ---------------------------------------------------------------------------
def _checkpoint_step(path: Path) -> int:
    import torch

    try:
        return int(torch.load(path, map_location="cpu", weights_only=True).get("step", -1))
    except Exception:  # noqa: BLE001 - an unreadable checkpoint is no checkpoint
        return -1


def restore_into(checkpoint: Any, work: Path) -> int | None:
    """Copy a Tune checkpoint's training checkpoint into ``work`` when it is newer.

    Returns the step it holds when it was copied, else None (no checkpoint, or the local one
    is at least as far: a retry on the same node).
    """
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        src = Path(d) / CHECKPOINT
        if not src.exists():
            return None
        step = _checkpoint_step(src)
        dest = work / CHECKPOINT
        if dest.exists() and _checkpoint_step(dest) >= step:
            return None
        tmp = dest.with_name(dest.name + ".restore")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
        return step


class TrialReporter:
    """The ``progress`` callback given to training inside a trial.

    Reports every ``report_every``-th step (and the last) with ``ray.tune.report``; whenever
    training wrote a checkpoint (``info["checkpoint"]``) it is attached as a
    ``ray.tune.Checkpoint`` (Tune persists a copy to its storage path before ``report``
    returns). Then calls ``step_hook``.
    """

    def __init__(self, unit: PersonalizeUnit, checkpoint_file: Path, report_every: int = 1,
                 step_hook: StepHook | None = None):
        self.unit = unit
        self.file = checkpoint_file
        self.report_every = max(1, int(report_every))
        self.step_hook = step_hook
        self.reports = 0
        self.checkpoints = 0

    def __call__(self, info: dict[str, Any]) -> None:
        step, steps = int(info["step"]), int(info.get("steps", 0))
        metrics = {"loss": float(info["loss"]), "triplet_accuracy": float(info["triplet_accuracy"]),
                   "step": step, "steps": steps}
        # train_one_instance names the checkpoint it wrote at this step (None when it wrote none)
        if info.get("checkpoint") is not None and self.file.exists():
            with tempfile.TemporaryDirectory(prefix="persrep-ckpt-") as d:
                shutil.copyfile(self.file, Path(d) / CHECKPOINT)
                (Path(d) / "unit.json").write_text(json.dumps({"key": self.unit.key, "seen_at_step": step}))
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
            self.checkpoints += 1
            self.reports += 1
        elif step % self.report_every == 0 or step == steps:
            tune.report(metrics)
            self.reports += 1
        if self.step_hook is not None:
            self.step_hook(self.unit, info)


def call_unit(ctx: Any, unit: PersonalizeUnit, progress: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """The library's unit function, reporting each training step (and checkpoint) to ``progress``."""
    from persrep.pipeline.stages import personalization

    return personalization.run_personalize_unit(ctx, unit, progress=progress)


def _final_metrics(value: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"unit_status": value.get("status", "done"),
                           "outcome": json.dumps(value, default=str)}
    for k, v in value.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            out[f"final_{k}" if not k.startswith("final_") else k] = float(v)
    return out


@dataclass(frozen=True)
class TrialOptions:
    """How a trial trains its unit: reports every ``report_every`` steps, ``step_hook`` after each,
    ``data_parallel_workers`` > 1: a TorchTrainer over that many workers (on GPUs with
    ``use_gpu``), ``unit_fn`` replaces :func:`call_unit` (the scale simulation's trivial trainer)."""

    report_every: int = 1
    step_hook: StepHook | None = None
    data_parallel_workers: int = 0
    use_gpu: bool = False
    unit_fn: UnitFn | None = None


def personalize_trial(config: dict[str, Any], ctx: Any = None, units: Mapping[str, PersonalizeUnit] | None = None,
                      options: TrialOptions | None = None) -> None:
    """The Tune function trainable: one personalisation unit."""
    opts = options or TrialOptions()
    unit = (units or {}).get(config["unit"])
    # not this launch's to train (a restored experiment also holds trials of units published
    # since, e.g. before the driver was killed), or published meanwhile (another job)
    if unit is None or ctx.storage.is_finished(ADAPTERS, unit.key):
        tune.report(_final_metrics({"status": "skipped", "key": config["unit"]}))
        return
    if opts.data_parallel_workers > 1:
        from persrep.distributed.data_parallel import DataParallel, train_data_parallel
        from ray.tune.integration.ray_train import TuneReportCallback

        try:
            value = train_data_parallel(ctx, unit, DataParallel(opts.data_parallel_workers, opts.use_gpu,
                                                                callbacks=(TuneReportCallback(),)))
        except Exception as exc:  # noqa: BLE001 - rejected (reported) or retried (raised)
            _reject_or_raise(exc)
            return
        tune.report(_final_metrics(value))
        return
    work = scratch_dir(ctx, "train", unit.key)
    restored = restore_into(tune.get_checkpoint(), work)
    reporter = TrialReporter(unit, work / CHECKPOINT, opts.report_every, opts.step_hook)
    try:
        value = (opts.unit_fn or call_unit)(ctx, unit, reporter)
    except Exception as exc:  # noqa: BLE001 - rejected (reported) or retried (raised)
        _reject_or_raise(exc)
        return
    if restored is not None:
        value = {**value, "restored_from_tune_checkpoint": restored}
    import torch

    tune.report(_final_metrics({**value, "peak_rss_mb": peak_rss_mb(), "torch_threads": torch.get_num_threads()}))


def _reject_or_raise(exc: Exception) -> None:
    """A trial's failure under the retry policy (persrep.pipeline.retry): one the same inputs
    raise again (``UnitRejected``, no positives, a shape, a missing key) is reported as the trial's
    final result, so Tune does not restart it; any other is raised, for ``FailureConfig`` to retry."""
    cause = getattr(exc, "cause", None) or exc  # Ray Train wraps a worker's error
    if POLICY.retryable(cause):
        raise exc
    tune.report(_final_metrics({"status": "failed", "error": POLICY.line(cause),
                                "details": getattr(cause, "details", None) or {}}))


def peak_rss_mb() -> float:
    """Peak resident memory of this process (the trial's actor) so far, in MiB."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


# -- on the driver ----------------------------------------------------------------------------
@dataclass
class _TrialRecord:
    label: str
    started: float = field(default_factory=time.perf_counter)
    finished: float | None = None
    status: str = "running"  # running | complete | error
    num_failures: int = 0
    last_result: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    trace: str | None = None  # the trial's error file (full traceback), when it failed


@dataclass
class _StageState:
    labels: dict[str, str]
    progress: Progress | Callable[[str], None]
    callbacks: list[Any]
    records: dict[str, _TrialRecord] = field(default_factory=dict)
    total: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.progress = as_progress(self.progress)


# experiment name -> this driver's state (never pickled). Tuner.restore un-pickles the run config
# of the earlier launch, callbacks included, and Ray 2.60 has no public way to hand it this
# launch's callbacks (tests/test_tune_stage.py pins that): the restored StageCallback finds this
# launch's progress function, labels and callbacks here, by the experiment's name.
_STATES: dict[str, _StageState] = {}

# Every hook of the public tune.Callback; StageCallback forwards each to this launch's callbacks
# (tests/test_tune_stage.py fails, naming it, when Ray adds one).
FORWARDED_HOOKS = ("setup", "on_step_begin", "on_step_end", "on_trial_start", "on_trial_restore",
                   "on_trial_save", "on_trial_result", "on_trial_complete", "on_trial_recover",
                   "on_trial_error", "on_checkpoint", "on_experiment_end")


def _trial_error(trial: Any) -> str:
    """The latest error of a trial, in one line (read from the driver's copy of its error files)."""
    import ray.cloudpickle as cloudpickle

    for path in (getattr(trial, "pickled_error_file", None),):
        if path and os.path.exists(path):
            try:
                with open(path, "rb") as f:
                    return root_cause(cloudpickle.load(f))
            except Exception:  # noqa: BLE001 - fall back to the text trace
                pass
    try:
        exc = trial.get_pickled_error()
        if exc is not None:
            return root_cause(exc)
    except Exception:  # noqa: BLE001
        pass
    txt = ""
    path = getattr(trial, "error_file", None)
    if path and os.path.exists(path):
        txt = Path(path).read_text(errors="replace")
    lines = [ln for ln in txt.strip().splitlines() if ln.strip() and not ln.startswith("Failure #")]
    return (lines[-1] if lines else "trial failed")[:300]


def _trial_trace(trial: Any) -> str | None:
    """The full text of a trial's error file (every failure's traceback), if there is one."""
    path = getattr(trial, "error_file", None)
    if path and os.path.exists(path):
        return Path(path).read_text(errors="replace")
    return None


class StageCallback(tune.Callback):
    """Driver-side hook: records each trial's fate and prints progress; runs the user callbacks.

    It pickles (into Tune's experiment state) as a bare token: a relaunch that restores the
    experiment finds *this* driver's progress function, labels and callbacks (e.g. an
    ``MLflowLoggerCallback`` nesting under this job's parent run), never stale copies. Every
    public hook (:data:`FORWARDED_HOOKS`) is passed on to those callbacks; their state is not
    saved into the experiment (they belong to one launch).
    """

    def __init__(self, token: str):
        self.token = token

    def _forward(self, hook: str, info: dict[str, Any]) -> None:
        state = _STATES.get(self.token)
        for callback in state.callbacks if state else []:
            getattr(callback, hook)(**info)

    def __getstate__(self) -> dict[str, Any]:
        return {"token": self.token}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.token = state["token"]

    def _state(self) -> _StageState | None:
        return _STATES.get(self.token)

    def _record(self, trial: Any) -> _TrialRecord | None:
        st = self._state()
        if st is None:
            return None
        key = trial.config["unit"]
        if key not in st.labels:  # a restored trial of a unit published earlier: not ours
            return None
        with st.lock:
            if key not in st.records:
                st.records[key] = _TrialRecord(st.labels.get(key, key))
            return st.records[key]

    def on_trial_start(self, **info: Any) -> None:
        rec = self._record(info["trial"])
        if rec is not None:
            rec.status = "running"
        self._forward("on_trial_start", info)

    def on_trial_recover(self, **info: Any) -> None:
        trial = info["trial"]
        rec, st = self._record(trial), self._state()
        if rec is not None and st is not None:
            rec.num_failures = trial.num_failures
            err = _trial_error(trial)
            rec.errors.append(err)
            st.progress.on_retry(STAGE, rec.label, trial.num_failures + 1, err)
        self._forward("on_trial_recover", info)

    def on_trial_complete(self, **info: Any) -> None:
        trial = info["trial"]
        rec, st = self._record(trial), self._state()
        if rec is not None and st is not None:
            rec.status, rec.finished = "complete", time.perf_counter()
            rec.num_failures = trial.num_failures
            rec.last_result = dict(trial.last_result or {})
            self._done_line(st, rec, rec.last_result.get("unit_status", "done"))
        self._forward("on_trial_complete", info)

    def on_trial_error(self, **info: Any) -> None:
        trial = info["trial"]
        rec, st = self._record(trial), self._state()
        if rec is not None and st is not None:
            rec.status, rec.finished = "error", time.perf_counter()
            rec.num_failures = trial.num_failures
            rec.errors.append(_trial_error(trial))
            rec.trace = _trial_trace(trial)
            rec.last_result = dict(trial.last_result or {})
            self._done_line(st, rec, "failed")
        self._forward("on_trial_error", info)

    @staticmethod
    def _done_line(st: _StageState, rec: _TrialRecord, status: str) -> None:
        with st.lock:
            n = sum(r.status != "running" for r in st.records.values())
        attempts = rec.num_failures + (status != "failed") if rec.num_failures else 1
        st.progress.on_unit(STAGE, n, st.total, rec.label, status, attempts)

    # the hooks StageCallback does not handle itself only pass through
    def setup(self, **info: Any) -> None:
        self._forward("setup", info)

    def on_step_begin(self, **info: Any) -> None:
        self._forward("on_step_begin", info)

    def on_step_end(self, **info: Any) -> None:
        self._forward("on_step_end", info)

    def on_trial_restore(self, **info: Any) -> None:
        self._forward("on_trial_restore", info)

    def on_trial_save(self, **info: Any) -> None:
        self._forward("on_trial_save", info)

    def on_trial_result(self, **info: Any) -> None:
        self._forward("on_trial_result", info)

    def on_checkpoint(self, **info: Any) -> None:
        self._forward("on_checkpoint", info)

    def on_experiment_end(self, **info: Any) -> None:
        self._forward("on_experiment_end", info)


def _prior_trials(exp_path: str, fs: Any) -> dict[str, str]:
    """unit key -> status of the trials of an existing experiment."""
    try:
        analysis = tune.ExperimentAnalysis(exp_path, storage_filesystem=fs)
    except Exception:  # noqa: BLE001 - unreadable state: start afresh
        return {}
    return {t.config.get("unit"): t.status for t in analysis.trials if t.config.get("unit")}


@dataclass
class PersonalizationStage:
    """The personalisation stage on Ray Tune: its options as state, ``run(units)`` the stage.

    ``tracking_tags`` (e.g. ``{"mlflow.parentRunId": id}``) are merged into the tags of every
    ``MLflowLoggerCallback`` in ``callbacks`` and of the one built from ``mlflow`` (keyword
    arguments of ``MLflowLoggerCallback``, e.g. ``Tracker.tune_callback_kwargs()``), so each
    trial's run nests under the job's parent run. ``step_hook(unit, info)`` runs inside the trial
    after each step is reported (fault injection in tests, custom stopping). With
    ``data_parallel_workers > 1`` each trial fits a ``TorchTrainer`` over that many workers
    (:mod:`persrep.distributed.data_parallel`). Ray must be initialised, or be started by
    ``plan()``, which runs once there is a trial to start and returns the run's resource plan
    (the job's cluster start and memory plan: a stage with every adapter published needs
    neither; without it a trial reserves no memory).
    """

    ctx: Any
    progress: Progress | Callable[[str], None] | None = None
    max_retries: int | None = None  # None: resources.max_retries
    tracking_tags: Mapping[str, str] | None = None
    callbacks: Sequence[Any] | None = None
    mlflow: Mapping[str, Any] | None = None
    name: str | None = None  # the Tune experiment (None: a content key of the units)
    storage_path: str | None = None  # None: tune_common.tune_storage(ctx)
    storage_filesystem: Any = None
    report_every: int | None = None  # None: resources.tune_report_every (default 1: every step)
    step_hook: StepHook | None = None
    data_parallel_workers: int = 0
    max_concurrent_trials: int | None = None
    unit_fn: UnitFn | None = None
    plan: Callable[[], ResourcePlan] | None = None

    def run(self, units: Sequence[PersonalizeUnit], labels: Sequence[str] | None = None) -> list[Outcome]:
        """One :class:`Outcome` per unit, in order (``labels``: default the units' labels)."""
        ctx, say = self.ctx, as_progress(self.progress)
        settings = ctx.settings
        max_retries = settings.resources.max_retries if self.max_retries is None else self.max_retries
        labels = list(labels) if labels is not None else [u.label for u in units]
        if len(labels) != len(units):
            raise ValueError(f"{len(labels)} labels for {len(units)} units")

        outcomes: list[Outcome | None] = [None] * len(units)
        todo: dict[str, PersonalizeUnit] = {}
        label_of: dict[str, str] = {}
        for i, u in enumerate(units):
            if not u.key:
                raise ValueError(f"unit {labels[i]} has no key (set it with personalize_key)")
            if u.key in todo:
                continue
            if ctx.storage.is_intact(ADAPTERS, u.key):
                outcomes[i] = Outcome(labels[i], "skipped", {"status": "skipped", "key": u.key})
            else:
                todo[u.key], label_of[u.key] = u, labels[i]
        say(f"{STAGE}: {len(units) - len(todo)} of {len(units)} units already published; "
            f"{len(todo)} to train as Tune trials")

        if todo:
            memory = self.plan().memory_of(STAGE) if self.plan is not None else 0
            records = self._trials(todo, label_of, say, max_retries, self.name or experiment_name(units), memory)
            by_key = {k: _outcome(ctx, k, label_of[k], records.get(k)) for k in todo}
            for i, u in enumerate(units):
                if outcomes[i] is None:
                    o = by_key[u.key]
                    outcomes[i] = Outcome(labels[i], o.status, o.value, o.error, o.attempts, o.seconds, o.trace)
        return [o for o in outcomes if o is not None]

    def _trials(self, todo: dict[str, PersonalizeUnit], label_of: dict[str, str], say: Progress,
                max_retries: int, name: str, memory: int) -> dict[str, _TrialRecord]:
        """Run ``todo`` as the trials of one Tune experiment (restored when it can be); their
        records (``memory``: the bytes a trial reserves)."""
        ctx, settings = self.ctx, self.ctx.settings
        tracking_tags, callbacks, mlflow = self.tracking_tags, list(self.callbacks or []), self.mlflow
        dp_workers, step_hook = self.data_parallel_workers, self.step_hook
        report_every = settings.resources.tune_report_every if self.report_every is None else self.report_every
        storage_path, fs = self.storage_path, self.storage_filesystem
        if storage_path is None:
            storage_path, fs = tune_storage(ctx)
        if tracking_tags:
            for cb in callbacks:  # MLflowLoggerCallback keeps its tags in .tags
                if isinstance(getattr(cb, "tags", None), dict):
                    cb.tags.update(tracking_tags)
        if mlflow:
            callbacks.append(mlflow_callback(mlflow, tracking_tags))

        gpus = cluster_gpus()
        resources = trial_resources(settings, gpus, dp_workers, memory)
        use_gpu = gpus > 0 and settings.resources.tune_trial_gpus > 0  # as trial_resources reserves
        if dp_workers > 1 and use_gpu and gpus < dp_workers:
            # Train would wait for the GPUs forever: say so now
            raise ValueError(f"data_parallel_workers={dp_workers} needs {dp_workers} GPUs, the cluster has "
                             f"{gpus:g}: lower it, or set resources.gpus_per_trial=0 (gpus_per_tune_trial unset) to train on CPUs")
        trainable = tune.with_resources(
            tune.with_parameters(personalize_trial, ctx=ctx, units=todo,
                                 options=TrialOptions(report_every, step_hook, dp_workers, use_gpu, self.unit_fn)),
            resources)

        keys = sorted(todo)
        exp_path = f"{storage_path.rstrip('/')}/{name}"
        restore = False
        if tune.Tuner.can_restore(exp_path, storage_filesystem=fs):
            prior = _prior_trials(exp_path, fs)
            resumable = {k for k, status in prior.items() if status != "TERMINATED"}
            if set(keys) <= resumable:
                restore = True
            else:  # the old experiment does not cover what is left: a fresh one beside it
                name = f"{name}-{content_key(keys, length=8)}"
                exp_path = f"{storage_path.rstrip('/')}/{name}"
                restore = tune.Tuner.can_restore(exp_path, storage_filesystem=fs) and \
                    set(keys) <= {k for k, s in _prior_trials(exp_path, fs).items() if s != "TERMINATED"}

        # the token is the experiment's name: a restored run config (which holds the StageCallback
        # pickled by the earlier launch) finds this launch's state under the same token
        token = name
        if token in _STATES:
            raise RuntimeError(f"Tune experiment {name} is already running in this process")
        state = _StageState(dict(label_of), say, callbacks, total=len(keys))
        _STATES[token] = state
        try:
            if restore:
                say(f"{STAGE}: resuming Tune experiment {exp_path}")
                tuner = tune.Tuner.restore(exp_path, trainable, resume_unfinished=True,
                                           resume_errored=True, storage_filesystem=fs)
            else:
                tuner = tune.Tuner(
                    trainable,
                    param_space={"unit": tune.grid_search(keys)},
                    tune_config=tune.TuneConfig(
                        max_concurrent_trials=self.max_concurrent_trials or settings.resources.max_concurrent_trials,
                        reuse_actors=True, trial_name_creator=_TrialNamer(token),
                        trial_dirname_creator=_TrialNamer(token, dirs=True)),
                    run_config=tune.RunConfig(
                        name=name, storage_path=storage_path, storage_filesystem=fs,
                        failure_config=tune.FailureConfig(max_failures=max_retries),
                        checkpoint_config=trial_checkpoint_config(settings),
                        callbacks=[StageCallback(token)], verbose=0))
            with tracking_env_restored(), without_trial_loggers():  # MLflow's callback sets env process-wide
                tuner.fit()
            return dict(state.records)
        finally:
            _STATES.pop(token, None)


def _outcome(ctx: Any, key: str, label: str, rec: _TrialRecord | None) -> Outcome:
    if rec is None or rec.status == "running":
        # no trial ran for it in this launch (e.g. it finished in an earlier, restored launch)
        if ctx.storage.is_finished(ADAPTERS, key):
            return Outcome(label, "done", {"status": "done", "key": key})
        return Outcome(label, "failed", {}, "no Tune trial ran for this unit", 1)
    seconds = (rec.finished or time.perf_counter()) - rec.started
    if rec.status == "complete":
        try:
            value = json.loads(rec.last_result.get("outcome", "{}"))
        except (TypeError, ValueError):
            value = {}
        value = value or {"status": "done", "key": key}
        if value.get("status") == "failed":  # rejected inside the trial (retry policy): reported, not retried
            return Outcome(label, "failed", value.get("details") or {}, value.get("error"),
                           rec.num_failures + 1, seconds)
        return Outcome(label, value.get("status", "done"), value, None, rec.num_failures + 1, seconds)
    err = rec.errors[-1] if rec.errors else "trial failed"
    return Outcome(label, "failed", {}, err, max(1, rec.num_failures), seconds, rec.trace)


@dataclass
class TunePersonalization(StageRunner):
    """The executor's stage runner for personalisation: one Ray Tune trial per unit
    (:class:`PersonalizationStage` with the job's progress, labels, tracker tags and plan)."""

    max_retries: int
    step_hook: StepHook | None = None
    how: str = "Ray Tune"

    def run(self, job: StageJob) -> list[Outcome]:
        tracker = job.tracker
        return PersonalizationStage(
            job.ctx, job.progress, self.max_retries,
            tracker.parent_run_tags() if tracker is not None else None,
            data_parallel_workers=job.ctx.settings.resources.data_parallel_workers, step_hook=self.step_hook,
            plan=job.plan).run(job.units, job.labels)
