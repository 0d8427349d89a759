"""Ray Tune sweeps over a ``tune_spaces/*.yaml`` space (``ray_jobs/sweep.py``).

``run_sweep``: (1) connects tracking and prepares the run (storage, data set, models) for the
space's base settings; (2) plans every data combination and groups them into distinct data
options (:mod:`persrep.sweep.data`); (3) generates the union of their synthetic data once, on
the executor (Ray tasks + Ray Data), skipping published units; (4) runs Ray Tune over the
parameter space ``{"data": <option label>, <trial key>: <distribution>, ...}`` with a function
trainable (:func:`persrep.sweep.trial.run_trial`, one trial = every instance, reporting the
running objective after each); (5) writes the table of trials, the per-instance rows and the best
trial under ``<root>/sweeps/<name>/`` (beside Tune's own experiment directory, which is the
same folder) and to MLflow: one parent run for the sweep, one nested child per trial
(``MLflowLoggerCallback`` tagged with the parent's id).

Search: ``grid`` (``tune.grid_search`` over every dimension), ``random`` (Tune's
``BasicVariantGenerator``: grid dimensions crossed, the others sampled ``num_samples`` times per
grid point, seeded), ``optuna`` (``OptunaSearch``, TPE, seeded; every dimension, the data option
included, is sampled by Optuna; ``num_samples`` = trials). ``early_stopping: {type: asha}``
adds an ``ASHAScheduler`` over ``instances_done`` (``max_t`` = instances).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ray import tune

from persrep.distributed.tune_common import mlflow_callback, root_cause, tune_storage
from persrep.pipeline.context import RunContext, prepare_run
from persrep.sweep.data import DataOption, generate_data, resolve_data
from persrep.sweep.results import (SweepResult, TrialRecord, best_trial, format_trials,
                                   trials_frame, write_outputs)
from persrep.sweep.resources import SweepResources, plan_sweep_resources
from persrep.sweep.space import SweepError, SweepSpace
from persrep.sweep.trial import OBJECTIVE, run_trial
from persrep.tracking.store import tracking_env_restored

Progress = Callable[[str], None]


# -- inside a trial -----------------------------------------------------------------------------
def sweep_trial(config: dict[str, Any], ctx: RunContext | None = None, space: SweepSpace | None = None,
                options: dict[str, DataOption] | None = None) -> None:
    """The Tune function trainable: one point of the space, every instance."""
    missing = [n for n, v in (("ctx", ctx), ("space", space), ("options", options)) if v is None]
    if missing:
        raise TypeError(f"sweep_trial needs {', '.join(missing)}: bind them with "
                        "tune.with_parameters(sweep_trial, ctx=..., space=..., options=...)")
    if config.get("data") not in options:
        raise KeyError(f"sweep_trial: config data={config.get('data')!r} is not one of the sweep's data "
                       f"options {sorted(options)}")
    option = options[config["data"]]
    run_trial(ctx, space, option, space.trial_values(config), report=tune.report)


# -- Tune search space ----------------------------------------------------------------------------
def param_space(space: SweepSpace, options: list[DataOption]) -> dict[str, Any]:
    """``{"data": ..., <trial key>: ...}`` as Tune domains for the space's search."""
    search = space.spec.search
    labels = [o.label for o in options]
    data_all_grid = all(space.dims[k].kind == "grid" for k in space.data_keys)
    out: dict[str, Any] = {}
    if search != "optuna" and data_all_grid:
        out["data"] = tune.grid_search(labels)
    else:
        out["data"] = tune.choice(labels)
    for key in space.trial_keys:
        dim = space.dims[key]
        vals = [space.encode(key, v) for v in dim.values]
        if dim.kind == "grid":
            out[key] = tune.grid_search(vals) if search != "optuna" else tune.choice(vals)
        elif dim.kind == "choice":
            out[key] = tune.choice(vals)
        elif dim.kind == "uniform":
            out[key] = tune.uniform(*vals)
        elif dim.kind == "loguniform":
            out[key] = tune.loguniform(*vals)
        else:  # randint: both ends included in the space file; Tune's upper end is exclusive
            out[key] = tune.randint(int(vals[0]), int(vals[1]) + 1)
    return out


def expected_trials(space: SweepSpace, options: list[DataOption]) -> int:
    """How many trials Tune will run for this space and these data options."""
    spec = space.spec
    if spec.search == "optuna":
        return spec.num_samples
    grid = space.trial_grid_size()
    if all(space.dims[k].kind == "grid" for k in space.data_keys):
        grid *= len(options)
    return grid * spec.num_samples


class _TrialName:
    """Trial (and MLflow run) names: ``<n>-<data>-<short key>=<value>...``; picklable."""

    def __init__(self, trial_keys: list[str], dirs: bool = False):
        self.trial_keys, self.dirs = list(trial_keys), dirs

    def __call__(self, trial: Any) -> str:
        import re

        cfg = trial.config
        parts = [str(cfg.get("data"))]
        for k in self.trial_keys:
            v = cfg.get(k)
            parts.append(f"{k.rsplit('.', 1)[-1]}={v:.3g}" if isinstance(v, float) else f"{k.rsplit('.', 1)[-1]}={v}")
        num = trial.trial_id.rsplit("_", 1)[-1]
        name = f"{num}-" + ",".join(parts)
        return re.sub(r"[^A-Za-z0-9_.=,+-]+", "_", name)[:100] + (f"-{trial.trial_id}" if self.dirs else "")


class _Progress(tune.Callback):
    """One line per finished trial on stderr (Tune's own status tables stay off)."""

    def __init__(self, total: int, metric: str):
        self.total, self.metric, self.finished = total, metric, 0

    def _line(self, trial: Any, status: str) -> None:
        self.finished += 1
        res = trial.last_result or {}
        obj = res.get(OBJECTIVE)
        shown = f"{obj:.4f}" if isinstance(obj, float) else "-"
        print(f"[{time.strftime('%H:%M:%S')}] sweep: {self.finished}/{self.total} {trial} -> {status} "
              f"{self.metric}={shown} after {res.get('instances_done', 0)} instance(s)",
              file=sys.stderr, flush=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(trial, "done")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(trial, "error")


def _storage_path(ctx: RunContext) -> tuple[str, Any]:
    return tune_storage(ctx, "sweeps", "sweeps")


def _free_name(ctx: RunContext, name: str) -> str:
    candidate, n = name, 1
    while ctx.storage.exists(f"sweeps/{candidate}/trials.csv") or \
            ctx.storage.list_dir(f"sweeps/{candidate}"):
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def _union_settings(space: SweepSpace):
    """Base settings whose generator types are every type the space uses (for prepare_run's
    checks: masks for cut-and-paste, the diffusion model for DreamBooth)."""
    types: list[str] = []
    for combo in space.data_combinations():
        for t in space.settings_for(combo).generator.types:
            if t not in types:
                types.append(t)
    return space.base.model_copy(update={"generator": space.base.generator.model_copy(update={"types": types})})


def _trial_error(result: Any) -> str | None:
    err = getattr(result, "error", None)
    return None if err is None else root_cause(err)


def run_sweep(space: SweepSpace, progress: Progress | None = None, *, executor: Any = None,
              name: str | None = None) -> SweepResult:
    """Validate, generate the data once, run the Tune sweep, write and track the outcome."""
    from persrep.tracking import Tracker

    say = progress or (lambda _m: None)
    base = space.base
    tracker = Tracker.from_settings(base, say=say).connect()  # required + down: fails here
    ctx = prepare_run(_union_settings(space), say, run_id=name or time.strftime("%Y%m%d-%H%M%S"))
    ctx = replace(ctx, settings=base)
    options = resolve_data(space, ctx)
    if "personalization.backbones" in space.trial_keys:  # every swept backbone's weights, now
        from persrep.pipeline.context import preflight_models

        for value in space.dims["personalization.backbones"].values:
            preflight_models(space.settings_for({**options[0].values, "personalization.backbones": value}))
    n_inst = len(ctx.instances)
    es = space.spec.early_stopping
    if es is not None and es.grace >= n_inst:
        raise SweepError(f"sweep space {space.path}: early_stopping.grace={es.grace} >= {n_inst} "
                         "instances: no trial could be stopped early; lower grace or remove early_stopping")
    n_trials = expected_trials(space, options)
    say(f"sweep {space.name}: {space.spec.search} search over {len(options)} data configuration(s) "
        f"x {len(space.trial_keys)} trial key(s) -> {n_trials} trials on {n_inst} instances; "
        f"objective = mean {space.spec.metric} ({space.spec.mode})")

    if executor is None:
        from persrep.distributed.ray_executor import RayExecutor

        executor = RayExecutor(base.resources.max_retries, say)
    # before compute: what data units and trials reserve; one that fits nowhere is refused here
    resources = plan_sweep_resources(ctx, space, options, n_trials, executor.node_shapes(), say)
    exp_name = _free_name(ctx, f"{space.name}-{ctx.run_id}")
    parent = tracker.start_parent(f"sweep-{exp_name}", base, tags={
        "persrep.kind": "sweep", "persrep.sweep": exp_name, "persrep.space": space.path,
        "persrep.run_id": ctx.run_id})
    tracker.log_params({"sweep.space": space.path, "sweep.search": space.spec.search,
                        "sweep.metric": space.spec.metric, "sweep.mode": space.spec.mode,
                        "sweep.num_samples": space.spec.num_samples, "sweep.trials": n_trials,
                        "sweep.data_options": len(options),
                        "sweep.dimensions": json.dumps({k: d.model_dump(exclude_none=True)
                                                        for k, d in space.dims.items()})})
    tracker.log_text(space.text, "space.yaml")
    try:
        result = _run(_SweepJob(space, ctx, options, executor, tracker, exp_name, n_trials, resources, say))
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED" if result.exit_code == 0 else "FAILED")
    if parent:
        result.notes.append(f"mlflow: parent run {parent} at {tracker.safe_uri}")
    return result


@dataclass(frozen=True)
class _SweepJob:
    """One launch of a sweep, validated and planned: what :func:`_run` runs."""

    space: SweepSpace
    ctx: RunContext
    options: list[DataOption]
    executor: Any
    tracker: Any
    exp_name: str
    n_trials: int
    resources: SweepResources
    say: Progress


def _run(job: _SweepJob) -> SweepResult:
    import pandas as pd

    from persrep.distributed.session import cluster_gpus
    from persrep.distributed.tune_stage import trial_resources

    space, ctx, options, tracker, exp_name, n_trials, say = (job.space, job.ctx, job.options, job.tracker,
                                                            job.exp_name, job.n_trials, job.say)
    data = generate_data(ctx, space, options, job.executor, say, job.resources.data)
    say(data.line())
    tracker.log_metrics({f"data.{k}": float(v) for k, v in
                         {"planned_synthesis": data.planned["synthesis"],
                          "planned_generators": data.planned["generator_prep"],
                          "generated_synthesis": data.stages.get("synthesis", {}).get("done", 0),
                          "generated_generators": data.stages.get("generator_prep", {}).get("done", 0),
                          "failed": len(data.failures)}.items()})
    storage_path, fs = _storage_path(ctx)
    empty = SweepResult(exp_name, space, trials_frame(space, options, []), None, data,
                        f"{storage_path}/{exp_name}")
    if data.failures:
        for f in data.failures:
            say(f"FAILED data {f['data']} {f['stage']} {f['unit']}: {f['error']}")
        empty.notes.append("the data phase failed: no trials were run (re-run to retry the failed units)")
        return empty

    spec = space.spec
    settings = space.base
    by_label = {o.label: o for o in options}
    trainable = tune.with_resources(
        tune.with_parameters(sweep_trial, ctx=ctx, space=space, options=by_label),
        trial_resources(settings, cluster_gpus(), memory_bytes=job.resources.trial_memory))
    search_alg: Any
    if spec.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=spec.seed)
    else:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        search_alg = BasicVariantGenerator(random_state=spec.seed)
    scheduler = None
    if spec.early_stopping is not None:
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(time_attr="instances_done", max_t=len(ctx.instances),
                                  grace_period=spec.early_stopping.grace,
                                  reduction_factor=spec.early_stopping.reduction_factor)
    callbacks: list[Any] = [_Progress(n_trials, spec.metric)]
    mlflow = tracker.tune_callback_kwargs()
    if mlflow:  # one child run per trial, nested under the sweep's parent run
        callbacks.append(mlflow_callback(mlflow, {"persrep.kind": "trial", "persrep.sweep": exp_name}))
    tuner = tune.Tuner(
        trainable,
        param_space=param_space(space, options),
        tune_config=tune.TuneConfig(
            metric=OBJECTIVE, mode=spec.mode, search_alg=search_alg, scheduler=scheduler,
            num_samples=spec.num_samples,
            max_concurrent_trials=spec.max_concurrent or settings.resources.max_concurrent_trials,
            trial_name_creator=_TrialName(space.trial_keys),
            trial_dirname_creator=_TrialName(space.trial_keys, dirs=True)),
        run_config=tune.RunConfig(
            name=exp_name, storage_path=storage_path, storage_filesystem=fs,
            failure_config=tune.FailureConfig(max_failures=settings.resources.max_retries),
            callbacks=callbacks, verbose=0))
    t0 = time.perf_counter()
    with tracking_env_restored():  # Tune's MLflow callback sets it process-wide
        grid = tuner.fit()
    say(f"sweep: {len(grid)} trials in {time.perf_counter() - t0:.1f} s")

    records = []
    for r in grid:  # trial dir = "<trial name>-<trial id>"; the name is also the MLflow run's
        trial = Path(r.path).name.rsplit("-", 1)[0]
        records.append(TrialRecord(trial, dict(r.config or {}), dict(r.metrics or {}), _trial_error(r)))
    frame = trials_frame(space, options, records)
    best = best_trial(space, frame)
    result = SweepResult(exp_name, space, frame, best, data, f"{storage_path}/{exp_name}")
    result.output_uri = write_outputs(ctx.storage, result, records)

    # the parent run: best config and objective, the table of trials
    tracker.log_table(pd.DataFrame(frame.astype(str)), "trials")
    if best:
        tracker.log_metrics({"best_objective": best["objective"]})
        tracker.log_params({f"best.{k}": v for k, v in best["params"].items()})
        tracker.log_text(json.dumps(best, indent=1, default=str), "best.json")
        tracker.set_tags({"persrep.best_trial": best["trial"]})
    tracker.log_metrics({"trials": float(len(frame)),
                         "trials_complete": float((frame["status"] == "complete").sum()),
                         "trials_stopped": float((frame["status"] == "stopped").sum()),
                         "trials_error": float((frame["status"] == "error").sum())})
    return result


__all__ = ["run_sweep", "param_space", "expected_trials", "sweep_trial", "format_trials"]
