"""Stage 3 on Ray Tune: one trial per unit, skip, retry, kill + resume, relaunch, MLflow nesting.

Real Ray (the session's ``ray_local``: 2 CPUs + 1 fake GPU, so trials run one at a time with
``gpu=1``), real files, the tiny toy world of test_pipeline with real-only positives.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from persrep.config import load_settings
from persrep.generation.plan import data_configs
from persrep.pipeline.context import prepare_run
from persrep.pipeline.stages.personalization import PersonalizeUnit
from persrep.pipeline.units import ADAPTERS


sys.path.insert(0, str(Path(__file__).parent))
from worlds import TINY  # noqa: E402

REAL_ONLY = [*TINY, "generator.types=[real_only]"]


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> str:
    """The toy world, generated once for the module (tests point data.path at it)."""
    root = tmp_path_factory.mktemp("toy")
    ctx = prepare_run(load_settings("local", [*REAL_ONLY, f"storage.root={root}"]), run_id="gen")
    return ctx.data_path


@pytest.fixture
def hooks_by_value(ray_local):
    # step hooks are defined here; ship them by value (Ray workers cannot import test modules)
    import ray.cloudpickle as cp

    cp.register_pickle_by_value(sys.modules[__name__])
    yield
    cp.unregister_pickle_by_value(sys.modules[__name__])


def test_trial_resources_and_names():
    """No Ray needed: what a trial asks for, and how trials are named."""
    from persrep.distributed.tune_stage import experiment_name, trial_resources

    s = load_settings("local", ["resources.cpus_per_trial=0.5", "resources.gpus_per_trial=1"])
    assert trial_resources(s, gpus_in_cluster=0) == {"cpu": 0.5}           # CPU-only: fractional CPU
    assert trial_resources(s, gpus_in_cluster=4) == {"cpu": 0.5, "gpu": 1.0}  # one GPU per trial
    assert trial_resources(s, gpus_in_cluster=4, data_parallel_workers=2) == {"cpu": 0.01}
    s.resources.gpus_per_trial = 0
    assert trial_resources(s, gpus_in_cluster=4) == {"cpu": 0.5}

    class U:
        def __init__(self, key):
            self.key = key

    a = experiment_name([U("k1"), U("k2")])
    assert a == experiment_name([U("k2"), U("k1"), U("k1")]) != experiment_name([U("k1")])


def _ctx(toy_data: str, root: Path, *extra: str):
    s = load_settings("local", [*REAL_ONLY, f"data.path={toy_data}", f"storage.root={root}", *extra])
    return prepare_run(s, run_id="t")


def _units(ctx) -> list[PersonalizeUnit]:
    """Stage 3's units as the runner builds them (real-only positives, external negatives)."""
    units = []
    for cfg in data_configs(ctx.settings):
        for name in sorted(ctx.instances):
            for bs in ctx.settings.personalization.backbones:
                units.append(PersonalizeUnit(name, ctx.instances[name], cfg, bs, None, []).keyed(ctx))
    return units


def _adapter(ctx, key: str) -> dict[str, torch.Tensor]:
    path = Path(ctx.storage.path(ADAPTERS, key, "adapter.safetensors"))
    return load_file(path)


class FailOnce:
    """Raise (or kill the worker) at ``step`` of the matching instances, once per marker file."""

    def __init__(self, marker_dir: Path, instances: set[str], step: int, kill: bool = False,
                 always: set[str] = frozenset(), wipe_scratch: Path | None = None):
        self.marker_dir, self.instances, self.step = str(marker_dir), instances, step
        self.kill, self.always, self.wipe_scratch = kill, set(always), wipe_scratch

    def __call__(self, unit, info):
        if info["step"] != self.step:
            return
        if unit.instance in self.always:
            raise RuntimeError(f"injected permanent failure in {unit.instance}")
        if unit.instance not in self.instances:
            return
        marker = Path(self.marker_dir) / f"{unit.instance}.failed"
        if marker.exists():
            return
        marker.write_text(str(info["step"]))
        if self.kill:
            if self.wipe_scratch is not None:  # as if the retry landed on another node
                shutil.rmtree(self.wipe_scratch / unit.key, ignore_errors=True)
            os._exit(3)
        raise RuntimeError(f"injected failure in {unit.instance} at step {self.step}")


@pytest.mark.ray
def test_all_units_done_published_loadable_then_skipped(toy_data, tmp_path, ray_local):
    from persrep.config import TrackingSettings
    from persrep.contrastive.train import personalised_backbone
    from persrep.distributed.tune_stage import PersonalizationStage
    from persrep.models.backbones import build_backbone
    from persrep.tracking import Tracker

    ctx = _ctx(toy_data, tmp_path / "root")
    units = _units(ctx)
    assert len(units) == 4
    tracker = Tracker(TrackingSettings(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="tune-stage")).connect()
    parent = tracker.start_parent("job")
    lines: list[str] = []
    outs = PersonalizationStage(ctx, lines.append, 1, tracking_tags=tracker.parent_run_tags(),
                                mlflow=tracker.tune_callback_kwargs()).run(units)
    assert [o.status for o in outs] == ["done"] * 4, [(o.label, o.error) for o in outs]
    assert [o.label for o in outs] == [f"real_only:tf_efficientnet_lite0:{u.instance}" for u in units]
    assert all(o.attempts == 1 and o.value["key"] == u.key for o, u in zip(outs, units))
    assert sum("-> done" in ln for ln in lines) == 4

    # adapters are published, differ per instance, and load onto a fresh base
    x = torch.rand(2, 3, 64, 64)
    base = build_backbone(units[0].backbone).eval()
    with torch.no_grad():
        f0 = base.global_features(x, "cls+mean")
    adapters = [_adapter(ctx, u.key) for u in units]
    assert any(not torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])
    path = ctx.storage.path(ADAPTERS, units[0].key, "adapter.safetensors")
    with torch.no_grad():
        f1 = personalised_backbone(units[0].backbone, path).global_features(x, "cls+mean")
    assert f1.shape == f0.shape and not torch.allclose(f0, f1)
    # the published metrics are what the trial returned
    meta = ctx.storage.verify_unit(ADAPTERS, units[0].key).meta
    assert meta["metrics"]["final_loss"] == pytest.approx(outs[0].value["final_loss"])

    # per-step progress reached Tune and MLflow: one nested run per unit, named by its label
    import mlflow

    client = mlflow.MlflowClient(tracker.uri)
    exp = client.get_experiment_by_name("tune-stage")
    runs = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sorted(r.info.run_name for r in runs) == sorted(o.label for o in outs)
    run = runs[0]
    steps = [m.value for m in client.get_metric_history(run.info.run_id, "step")]
    assert steps[:3] == [1.0, 2.0, 3.0]
    assert "loss" in run.data.metrics and "triplet_accuracy" in run.data.metrics
    assert run.data.params["unit"] in {u.key for u in units}
    tracker.end()

    # a re-run trains nothing: every unit is skipped up front (no trial at all)
    lines.clear()
    again = PersonalizationStage(ctx, lines.append, 1).run(units)
    assert [o.status for o in again] == ["skipped"] * 4
    assert lines == ["personalization: 4 of 4 units already published; 0 to train as Tune trials"]


@pytest.mark.ray
def test_trial_raising_once_is_retried_and_reports_two_attempts(toy_data, tmp_path, hooks_by_value):
    from persrep.distributed.tune_stage import PersonalizationStage

    ctx = _ctx(toy_data, tmp_path / "root")
    units = [u for u in _units(ctx) if u.instance == "mug_0"]
    lines: list[str] = []
    out = PersonalizationStage(ctx, lines.append, max_retries=1,
                               step_hook=FailOnce(tmp_path, {"mug_0"}, step=2)).run(units)[0]
    assert (tmp_path / "mug_0.failed").exists()
    assert out.status == "done" and out.attempts == 2 and out.error is None, out
    assert ctx.storage.is_finished(ADAPTERS, units[0].key)
    assert any("retrying real_only:tf_efficientnet_lite0:mug_0 (attempt 2): RuntimeError: injected failure "
               "in mug_0 at step 2" in ln for ln in lines), "\n".join(lines)
    assert lines[-1] == "personalization: 1/1 real_only:tf_efficientnet_lite0:mug_0 -> done after 2 attempts"


@pytest.mark.ray
def test_failed_unit_is_reported_then_relaunch_resumes_the_experiment(toy_data, tmp_path, hooks_by_value):
    from persrep.distributed.tune_stage import PersonalizationStage, experiment_name

    ctx = _ctx(toy_data, tmp_path / "root")
    units = [u for u in _units(ctx) if u.instance in ("mug_0", "mug_1")]
    hook = FailOnce(tmp_path, set(), step=2, always={"mug_1"})
    outs = PersonalizationStage(ctx, max_retries=0, step_hook=hook).run(units)
    assert [o.status for o in outs] == ["done", "failed"]
    assert outs[1].attempts == 1 and outs[1].error == "RuntimeError: injected permanent failure in mug_1"
    assert not ctx.storage.is_finished(ADAPTERS, units[1].key)

    # relaunch with the fault gone: the same experiment is restored and its errored trial resumes
    lines: list[str] = []
    again = PersonalizationStage(ctx, lines.append, max_retries=0).run(units)
    assert [o.status for o in again] == ["skipped", "done"]
    assert any("resuming Tune experiment" in ln and experiment_name(units) in ln for ln in lines), lines
    assert again[1].attempts == 2  # the failed attempt of the first launch, then this one
    assert ctx.storage.is_finished(ADAPTERS, units[1].key)


@pytest.mark.ray
def test_killed_trial_resumes_from_tune_checkpoint_bitwise(toy_data, tmp_path, hooks_by_value):
    from persrep.distributed.tune_stage import PersonalizationStage

    extra = ["personalization.max_steps=6", "personalization.checkpoint_every=2"]
    # uninterrupted reference, the same way (a trial with the same threads and device)
    ref = _ctx(toy_data, tmp_path / "ref", *extra)
    unit_ref = [u for u in _units(ref) if u.instance == "bottle_0"]
    assert PersonalizationStage(ref).run(unit_ref)[0].status == "done"

    ctx = _ctx(toy_data, tmp_path / "root", *extra)
    unit = [u for u in _units(ctx) if u.instance == "bottle_0"]
    assert unit[0].key == unit_ref[0].key
    scratch = tmp_path / "root" / ".scratch" / "train"
    # the worker dies at step 5 (after the step-4 checkpoint was reported); its local scratch
    # is wiped too, so only the ray.tune.Checkpoint can bring the retry back to step 4
    hook = FailOnce(tmp_path, {"bottle_0"}, step=5, kill=True, wipe_scratch=scratch)
    lines: list[str] = []
    out = PersonalizationStage(ctx, lines.append, max_retries=1, step_hook=hook).run(unit)[0]
    assert (tmp_path / "bottle_0.failed").exists()  # the kill did happen
    assert out.status == "done" and out.attempts == 2, (out, lines)
    assert out.value["restored_from_tune_checkpoint"] == 4
    meta = ctx.storage.verify_unit(ADAPTERS, unit[0].key).meta
    assert meta["resumed_from"] == 4
    a, b = _adapter(ctx, unit[0].key), _adapter(ref, unit_ref[0].key)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (scratch / unit[0].key).exists()  # scratch is cleaned once published


@pytest.mark.ray
@pytest.mark.slow
def test_data_parallel_matches_single_process_and_survives_a_worker_failure(toy_data, tmp_path, ray_local):
    """TorchTrainer (Train V2), 2 workers x 0.5 CPU, DDP over the LoRA parameters, an uneven
    batch split (5 = 3 + 2): same losses and (up to float summation order) same adapter as
    single-process training; a worker that dies at step 3 restarts the group from step 2."""
    import json

    import numpy as np

    from persrep.contrastive.train import personalised_backbone, train_one_instance
    from persrep.distributed.data_parallel import DataParallel, train_data_parallel
    from persrep.pipeline.stages.personalization import training_data

    ctx = _ctx(toy_data, tmp_path / "root", "personalization.lora.dropout=0", "personalization.max_steps=4",
               "personalization.batch_size=5", "personalization.checkpoint_every=2")
    unit = _units(ctx)[0]
    marker = tmp_path / "dp.failed"
    value = train_data_parallel(ctx, unit, DataParallel(2, False, cpus_per_worker=0.5, max_failures=1),
                                _fault={"fail_at_step": 3, "fail_marker": str(marker)})
    assert marker.exists()  # the injected failure happened
    assert value["status"] == "done" and value["data_parallel_workers"] == 2
    assert value["resumed_from"] == 2  # the group restarted from the step-2 checkpoint

    single = train_one_instance(ctx.settings.personalization, unit.backbone, training_data(ctx, unit),
                                tmp_path / "single")
    published = json.loads(Path(ctx.storage.path(ADAPTERS, unit.key, "metrics.json")).read_text())
    # the full-batch InfoNCE is computed: a per-shard loss would differ at the first step already
    np.testing.assert_allclose(published["loss_history"], single.metrics["loss_history"], rtol=1e-4)
    a, b = _adapter(ctx, unit.key), load_file(single.adapter_path)
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    scale = max(b[k].abs().max().item() for k in b)
    assert scale > 1e-2 and diff < 2e-3 * scale, (diff, scale)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        feats = personalised_backbone(unit.backbone, ctx.storage.path(ADAPTERS, unit.key, "adapter.safetensors"))
        assert torch.isfinite(feats.global_features(x, "cls+mean")).all()
    assert train_data_parallel(ctx, unit, DataParallel(2, False, cpus_per_worker=0.5))["status"] == "skipped"


@pytest.mark.ray
def test_data_parallel_needing_more_gpus_than_the_cluster_fails_fast(toy_data, tmp_path, ray_local):
    from persrep.distributed.tune_stage import PersonalizationStage

    ctx = _ctx(toy_data, tmp_path / "root")  # ray_local has one (fake) GPU
    with pytest.raises(ValueError, match="data_parallel_workers=2 needs 2 GPUs, the cluster has 1"):
        PersonalizationStage(ctx, data_parallel_workers=2).run(_units(ctx)[:1])


@pytest.mark.ray
@pytest.mark.slow
def test_stage_runs_a_data_parallel_trial(toy_data, tmp_path, ray_local):
    """Train inside Tune: the trial fits a 2-worker TorchTrainer; Train's metrics reach Tune."""
    from persrep.distributed.tune_stage import PersonalizationStage

    ctx = _ctx(toy_data, tmp_path / "root", "personalization.max_steps=4", "personalization.checkpoint_every=2",
               "resources.cpus_per_actor=0.5", "resources.gpus_per_trial=0")
    units = _units(ctx)[:1]
    out = PersonalizationStage(ctx, data_parallel_workers=2).run(units)[0]
    assert out.status == "done" and out.attempts == 1, out
    assert out.value["data_parallel_workers"] == 2 and out.value["last_reported_step"] == 4
    assert ctx.storage.verify_unit(ADAPTERS, units[0].key).meta["metrics"]["data_parallel_workers"] == 2


def test_stage_callback_forwards_every_public_tune_hook():
    """StageCallback is a public ``tune.Callback`` that forwards each hook to this launch's
    callbacks (no private CallbackList internals). Fails, naming them, when Ray adds or drops a hook."""
    import pickle

    from ray import tune

    from persrep.distributed import tune_stage as ts

    hooks = {n for n, v in vars(tune.Callback).items()
             if callable(v) and (n.startswith("on_") or n == "setup")}
    assert hooks == set(ts.FORWARDED_HOOKS), (
        f"ray.tune.Callback's hooks changed ({sorted(hooks ^ set(ts.FORWARDED_HOOKS))}): forward the new "
        "ones in StageCallback and FORWARDED_HOOKS (persrep/distributed/tune_stage.py)")

    calls = []

    class Recorder:
        def __getattr__(self, hook):
            return lambda **info: calls.append((hook, info))

    class Trial:
        config = {"unit": "not-this-stage's"}  # a unit the stage does not know: only forwarded

    ts._STATES["pin-token"] = ts._StageState({}, lambda _m: None, [Recorder()])
    try:
        cb = pickle.loads(pickle.dumps(ts.StageCallback("pin-token")))  # as a restored run config
        for hook in ts.FORWARDED_HOOKS:
            getattr(cb, hook)(trial=Trial(), iteration=3)
    finally:
        ts._STATES.pop("pin-token")
    assert [h for h, _ in calls] == list(ts.FORWARDED_HOOKS)
    assert all(info["iteration"] == 3 for _, info in calls)


def test_tuner_restore_still_takes_no_new_callbacks():
    """Why tune_stage keeps this launch's state in a module dict keyed by the experiment name:
    Tuner.restore brings back the pickled run config and cannot be given new callbacks."""
    import inspect

    from ray import tune

    params = set(inspect.signature(tune.Tuner.restore).parameters)
    assert not params & {"run_config", "callbacks"}, (
        "ray.tune.Tuner.restore now accepts a run config / callbacks: pass this launch's callbacks "
        "there and drop tune_stage._STATES and StageCallback's token pickling")


class RaiseNoPositives:
    """A step hook that raises what an adapter without positives raises (the contrastive
    sampler's TripletError), every time: a failure the same inputs raise again."""

    def __call__(self, unit, info):
        from persrep.contrastive.triplets import TripletError

        if info["step"] == 1:
            raise TripletError(f"no positives for {unit.instance}")


@pytest.mark.ray
def test_deterministic_trial_failure_is_not_retried_by_tune(toy_data, tmp_path, hooks_by_value):
    """Issue #29: a trial whose unit raises an error the retry policy rejects reports it as its
    result (one attempt, one line) instead of raising, so FailureConfig does not restart it."""
    from persrep.distributed.tune_stage import PersonalizationStage

    ctx = _ctx(toy_data, tmp_path / "root")
    units = [u for u in _units(ctx) if u.instance == "mug_0"]
    lines: list[str] = []
    out = PersonalizationStage(ctx, lines.append, max_retries=2, step_hook=RaiseNoPositives()).run(units)[0]
    assert out.status == "failed" and out.attempts == 1, out
    assert out.error.startswith("TripletError: no positives for mug_0") and "\n" not in out.error
    assert not any("retrying" in ln for ln in lines), lines
    assert not ctx.storage.is_finished(ADAPTERS, units[0].key)


def _raise_value_error(ctx, unit):
    raise ValueError(f"train mask 2 of {unit} is empty")


def _raise_runtime_error(ctx, unit):
    raise RuntimeError(f"worker lost for {unit}")


@pytest.mark.ray
def test_ray_tasks_reject_deterministic_failures_and_retry_others(hooks_by_value):
    from persrep.distributed.ray_executor import RayExecutor
    from persrep.pipeline.resource_plan import Resources

    said: list[str] = []
    ex = RayExecutor(2, said.append)
    out = ex.map(_raise_value_error, None, ["u1"], ["masks:u1"], Resources(cpus=0.5), "auto_masks")[0]
    assert out.status == "failed" and out.attempts == 1 and "\n" not in out.error
    assert out.error.startswith("ValueError: train mask 2 of u1 is empty") and not any("retrying" in s for s in said)
    out = ex.map(_raise_runtime_error, None, ["u2"], ["masks:u2"], Resources(cpus=0.5), "auto_masks")[0]
    assert out.status == "failed" and out.attempts == 3 and out.error == "RuntimeError: worker lost for u2"
