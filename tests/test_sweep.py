"""Ray Tune sweeps (ray_jobs/sweep.py): the space format, its validation, expansion, and real
sweeps on the tiny toy world (local Ray, real files, real MLflow SQLite store).

The bad-input cases run ``ray_jobs/sweep.py``'s ``main`` and check exit code 2 and one clear line.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from persrep.sweep.space import load_space

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "tune_spaces" / "toy.yaml"


def _load_job():
    """ray_jobs/sweep.py as a module (under its own name: ray_jobs/ is not a package)."""
    spec = importlib.util.spec_from_file_location("persrep_sweep_job_for_tests", REPO / "ray_jobs" / "sweep.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


sweep_job = _load_job()

# trials run two at a time on the session's 2-CPU cluster (its fake GPU is left alone)
RUN = ["resources.gpus_per_trial=0", "resources.cpus_per_trial=1"]


def _toy_doc() -> dict:
    return yaml.safe_load(TOY.read_text())


def _write(tmp_path: Path, doc: dict | str, name: str = "space.yaml") -> str:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    return str(path)


# ---------------------------------------------------------------------------------------------
# the shipped spaces and the format
@pytest.mark.parametrize("name", ["toy", "local", "generation", "personalization"])
def test_shipped_spaces_validate(name):
    space = load_space(str(REPO / "tune_spaces" / f"{name}.yaml"))
    assert space.dims and set(space.data_keys) | set(space.trial_keys) == set(space.dims)
    for combo in space.data_combinations():  # every data combination builds valid settings
        assert len(space.settings_for(combo).personalization.backbones) == 1


def test_toy_space_split_and_grid_size():
    space = load_space(str(TOY))
    assert space.data_keys == ["generator.types"] and space.trial_keys == ["personalization.lora.rank"]
    assert space.grid_size() == 4 and space.trial_grid_size() == 2
    assert space.data_combinations() == [{"generator.types": "real_only"}, {"generator.types": "cut_paste"}]
    s = space.settings_for({"generator.types": "cut_paste", "personalization.lora.rank": 4})
    assert s.generator.types == ["cut_paste"] and s.personalization.lora.rank == 4
    assert s.data.toy.categories == 2  # the file's overrides are applied
    # command-line overrides go on top of the file's
    assert load_space(str(TOY), ["personalization.max_steps=2"]).base.personalization.max_steps == 2


def test_generation_space_expands_to_the_product():
    space = load_space(str(REPO / "tune_spaces" / "generation.yaml"))
    assert space.grid_size() == 4 * 3 * 3 == len(space.data_combinations())  # types x cfg x captions
    assert space.settings_for({"generator.types": "dreambooth", "synthesis.cfg": 7.5,
                               "synthesis.caption_sources": "captions"}).synthesis.cfg == [7.5]


def _cases():
    """(name, file text or doc patch, extra CLI args, substring the one error line must hold)."""
    base = "config: local\nmetric: retrieval.ndcg\noverrides: {generator.types: [real_only]}\n"
    ok_dim = "space:\n  personalization.lora.rank: {grid: [4, 8]}\n"
    return [
        ("empty space", base + "space: {}\n", [], "space is empty"),
        ("no space", base, [], "space is empty"),
        ("unknown key", base + "space:\n  personalization.lora.rnk: {grid: [4]}\n", [],
         "space.personalization.lora.rnk: unknown settings key"),
        ("section", base + "space:\n  personalization.lora: {grid: [4]}\n", [], "is a section"),
        ("not sweepable", base + "space:\n  data.max_instances: {grid: [2, 3]}\n", [], "not sweepable"),
        ("unknown distribution", base + "space:\n  personalization.temperature: {normal: [0, 1]}\n", [],
         "unknown distribution 'normal'"),
        ("two distributions", base + "space:\n  personalization.lora.rank: {grid: [4], choice: [8]}\n", [],
         "exactly one of"),
        ("bare list", base + "space:\n  personalization.lora.rank: [4, 8]\n", [], "expected a mapping"),
        ("empty grid", base + "space:\n  personalization.lora.rank: {grid: []}\n", [], "empty list"),
        ("duplicate values", base + "space:\n  personalization.lora.rank: {grid: [4, 4]}\n", [], "duplicate"),
        ("lo > hi", base + "search: random\nspace:\n  personalization.temperature: {uniform: [0.2, 0.1]}\n",
         [], "lo 0.2 >= hi 0.1"),
        ("loguniform lo <= 0", base + "search: random\nspace:\n  personalization.learning_rate: "
         "{loguniform: [0, 0.1]}\n", [], "must be > 0"),
        ("range of 3", base + "search: random\nspace:\n  personalization.temperature: {uniform: [0.1, 0.2, 0.3]}\n",
         [], "expected [lo, hi]"),
        ("randint fraction", base + "search: random\nspace:\n  personalization.lora.rank: {randint: [2, 4.5]}\n",
         [], "must be integers"),
        ("float range on int key", base + "search: random\nspace:\n  personalization.lora.rank: {uniform: [2, 8]}\n",
         [], "integer setting: use randint"),
        ("data key sampled", base + "search: random\nspace:\n  synthesis.num_positives: {randint: [2, 8]}\n",
         [], "use grid: or choice:"),
        ("grid search with a range", base + "space:\n  personalization.temperature: {uniform: [0.1, 0.2]}\n",
         [], "search: grid needs every dimension as grid"),
        ("grid with num_samples", base + "num_samples: 3\n" + ok_dim, [], "num_samples: search: grid"),
        ("unknown metric", base.replace("retrieval.ndcg", "retrieval.accuracy") + ok_dim, [],
         "unknown retrieval metric 'accuracy'"),
        ("unknown task", base.replace("retrieval.ndcg", "captioning.bleu") + ok_dim, [], "unknown task 'captioning'"),
        ("no metric", base.replace("metric: retrieval.ndcg\n", "") + ok_dim, [], "metric: missing"),
        ("metric task not evaluated", base + "space:\n  evaluation.tasks: {grid: [[classification]]}\n", [],
         "task retrieval is not in evaluation.tasks"),
        ("bad mode", base + "mode: maximize\n" + ok_dim, [], "mode"),
        ("unknown top-level key", base + "serach: random\n" + ok_dim, [], "unknown top-level key"),
        ("out-of-range value", base.replace("[real_only]", "[dreambooth]") + "space:\n  synthesis.cfg: {grid: [4, 50]}\n",
         [], "guidance scale 50.0 out of range"),
        ("value below minimum", base + "space:\n  personalization.lora.rank: {grid: [0, 4]}\n", [],
         "personalization.lora.rank: Input should be greater than or equal to 1"),
        ("wrong type", base + "space:\n  personalization.learning_rate: {grid: [fast]}\n", [],
         "personalization.learning_rate"),
        ("several data configs", base.replace("{generator.types: [real_only]}", "{}") + ok_dim, [],
         "a trial trains one data configuration, these settings give 3"),
        ("override clashes", base + ok_dim, ["personalization.lora.rank=4"], "also set in overrides"),
        ("bad base override", base + ok_dim, ["personalization.lora.alpha=-1"], "base settings"),
        ("bad base config", base.replace("config: local", "config: nosuch") + ok_dim, [],
         "no such named configuration"),
        ("not yaml", "config: [local\n", [], "not valid YAML"),
        ("not a mapping", "- a\n- b\n", [], "top level must be a mapping"),
    ]


@pytest.mark.parametrize("case", _cases(), ids=[c[0] for c in _cases()])
def test_bad_space_exits_2_with_one_clear_line(case, tmp_path, capsys):
    _, text, extra, needle = case
    path = _write(tmp_path, text)
    rc = sweep_job.main(["--space", path, "--storage", str(tmp_path / "root"), *extra])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2
    assert len(err) == 1, err
    assert needle in err[0], err[0]
    assert path in err[0]  # names the file
    assert not (tmp_path / "root").exists()  # nothing computed, nothing written


def test_missing_space_file(tmp_path, capsys):
    assert sweep_job.main(["--space", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# expansion over real data (no Ray): data combinations collapse by key
@pytest.fixture(scope="module")
def toy_ctx(tmp_path_factory):
    from persrep.pipeline.context import prepare_run

    space = load_space(str(TOY), [f"storage.root={tmp_path_factory.mktemp('plan')}"])
    return prepare_run(space.base, run_id="plan")


def test_data_configurations_deduplicated_by_key(toy_ctx, tmp_path):
    from persrep.distributed.sweep import expected_trials, param_space
    from persrep.sweep.data import resolve_data

    doc = _toy_doc()
    doc["overrides"]["data.path"] = toy_ctx.data_path
    doc["overrides"]["generator.dreambooth.steps"] = 2
    doc["space"] = {"generator.types": {"grid": ["real_only", "cut_paste", "dreambooth"]},
                    "synthesis.cfg": {"grid": [4, 5]},
                    "personalization.lora.rank": {"grid": [2, 4, 8]}}
    space = load_space(_write(tmp_path, doc), [f"storage.root={toy_ctx.storage.root}"])
    assert space.grid_size() == 3 * 2 * 3 and len(space.data_combinations()) == 6
    options = resolve_data(space, toy_ctx)
    # real_only and cut_paste ignore CFG (negatives are external here): one option each
    assert [o.label for o in options] == ["real_only", "cut_paste", "dreambooth/cfg4/template",
                                          "dreambooth/cfg5/template"]
    assert [len(o.members) for o in options] == [2, 2, 1, 1]
    assert options[0].column("synthesis.cfg") == "*" and options[2].column("synthesis.cfg") == 4
    assert options[0].unit_keys == set()  # real-only positives are the real photos
    assert len(options[1].synthesis_keys) == 4  # cut-and-paste: one unit per instance
    # the two DreamBooth options share their 4 trained generators, not their shards
    assert options[2].generator_keys == options[3].generator_keys and len(options[2].generator_keys) == 4
    assert not set(options[2].synthesis_keys.values()) & set(options[3].synthesis_keys.values())
    assert len({k for o in options for k in o.synthesis_keys.values()}) == 4 + 4 + 4
    # Tune sees one data dimension over the 4 distinct options, crossed with the rank grid
    assert expected_trials(space, options) == 4 * 3
    ps = param_space(space, options)
    assert ps["data"] == {"grid_search": [o.label for o in options]}
    assert ps["personalization.lora.rank"] == {"grid_search": [2, 4, 8]}


def test_sweep_memory_plan_reserves_the_largest_point(toy_ctx, tmp_path, monkeypatch):
    """A sweep's data units reserve their stage's estimate, its trials the largest personalisation
    or evaluation estimate over the space (here: a swept backbone and batch size); a trial that
    fits on no node is refused before compute."""
    from persrep.pipeline.memory import InsufficientResourcesError, NodeShape, estimate_stage
    from persrep.sweep.data import resolve_data
    from persrep.sweep.resources import plan_sweep_resources

    small = {"name": "tf_efficientnet_lite0", "weights": "offline", "image_size": 64}
    big = {"name": "vit_base_patch16_224", "weights": "random", "image_size": 224}
    doc = _toy_doc()
    doc["overrides"]["data.path"] = toy_ctx.data_path
    doc["overrides"]["generator.dreambooth.steps"] = 2
    for key in ("personalization.backbones", "personalization.batch_size"):
        del doc["overrides"][key]
    doc["space"] = {"generator.types": {"grid": ["cut_paste", "dreambooth"]},
                    "personalization.backbones": {"grid": [[small], [big]]},
                    "personalization.batch_size": {"grid": [4, 16]}}
    space = load_space(_write(tmp_path, doc), [f"storage.root={toy_ctx.storage.root}"])
    options = resolve_data(space, toy_ctx)
    ctx = toy_ctx
    said: list[str] = []
    node = NodeShape(cpus=8, gpus=0, memory_gb=64)
    planned = plan_sweep_resources(ctx, space, options, 8, [node], said.append)
    trial = planned.trial_memory
    heaviest = space.settings_for({"generator.types": ["dreambooth"], "personalization.backbones": [big],
                                   "personalization.batch_size": 16})
    expect = max(estimate_stage(heaviest, t).bytes for t in ("personalization", "evaluation"))
    lightest = space.settings_for({"generator.types": ["cut_paste"], "personalization.backbones": [small],
                                   "personalization.batch_size": 4})
    assert trial == expect > estimate_stage(lightest, "personalization").bytes
    # the data phase: DreamBooth's prep is the largest generator unit (cut-and-paste has none)
    assert planned.data.memory_of("generator_prep") == estimate_stage(heaviest, "generator_prep").bytes > 0
    assert planned.data.memory_of("synthesis") > 0
    assert any(line.startswith("plan sweep trials: 8 trial(s)") for line in said), said
    assert any(line.startswith("plan generator_prep:") for line in said), said
    # a large space: each dimension's heaviest corner, combined, finds the same point
    import persrep.sweep.resources as sweep_resources

    monkeypatch.setattr(sweep_resources, "FULL_PRODUCT", 1)
    assert plan_sweep_resources(toy_ctx, space, options, 8, [node], said.append).trial_memory == expect
    with pytest.raises(InsufficientResourcesError, match="personalization|evaluation"):
        plan_sweep_resources(toy_ctx, space, options, 8,
                             [NodeShape(cpus=8, gpus=0, memory_gb=expect / 1024 ** 3 * 0.5)], said.append)


def test_param_space_for_random_and_optuna(tmp_path):
    from ray.tune.search.sample import Categorical, Float, Integer

    from persrep.distributed.sweep import param_space
    from persrep.sweep.data import DataOption

    doc = _toy_doc()
    doc.update(search="random", num_samples=3)
    for k in ("personalization.learning_rate", "personalization.backbones"):
        doc["overrides"].pop(k)
    doc["space"] = {"generator.types": {"choice": ["real_only", "cut_paste"]},
                    "personalization.lora.rank": {"randint": [2, 8]},
                    "personalization.learning_rate": {"loguniform": [1e-4, 1e-2]},
                    "personalization.temperature": {"grid": [0.07, 0.1]},
                    "personalization.backbones": {"choice": [
                        [{"name": "tf_efficientnet_lite0", "weights": "offline", "image_size": 64}]]}}
    space = load_space(_write(tmp_path, doc))
    opts = [DataOption("real_only", "a", {}, [{}], "real_only"), DataOption("cut_paste", "b", {}, [{}], "cut_paste")]
    ps = param_space(space, opts)
    assert isinstance(ps["data"], Categorical) and ps["data"].categories == ["real_only", "cut_paste"]
    rank = ps["personalization.lora.rank"]
    assert isinstance(rank, Integer) and (rank.lower, rank.upper) == (2, 9)  # both ends included
    lr = ps["personalization.learning_rate"]
    assert isinstance(lr, Float) and (lr.lower, lr.upper) == (1e-4, 1e-2)
    assert ps["personalization.temperature"] == {"grid_search": [0.07, 0.1]}
    # a non-scalar choice reaches Tune/Optuna as JSON text and comes back decoded
    enc = ps["personalization.backbones"].categories[0]
    assert isinstance(enc, str)
    assert space.trial_values({"personalization.backbones": enc})["personalization.backbones"][0]["image_size"] == 64
    doc["search"] = "optuna"
    ps = param_space(load_space(_write(tmp_path, doc)), opts)
    assert isinstance(ps["personalization.temperature"], Categorical)  # Optuna has no grid


def test_trial_without_its_data_fails_clearly(toy_ctx):
    from persrep.sweep.data import DataOption
    from persrep.sweep.trial import SweepDataError, run_trial

    space = load_space(str(TOY), [f"storage.root={toy_ctx.storage.root}"])
    option = DataOption("cut_paste", "k", {"generator.types": "cut_paste"}, [{}], "cut_paste")
    with pytest.raises(SweepDataError, match=r"data configuration cut_paste: no training data for 4 instance"):
        run_trial(toy_ctx, space, option, {"personalization.lora.rank": 2})


def test_trials_table_best_and_exit_code():
    from persrep.sweep.data import DataOption, DataReport
    from persrep.sweep.results import (SweepResult, TrialRecord, best_trial, format_trials,
                                       trials_frame)

    space = load_space(str(TOY))
    opts = [DataOption("real_only", "a", {"generator.types": "real_only"}, [{"generator.types": "real_only"}],
                       "real_only")]
    rec = [TrialRecord("t1", {"data": "real_only", "personalization.lora.rank": 2},
                       {"objective": 0.5, "instances_done": 4, "instances_total": 4}),
           TrialRecord("t2", {"data": "real_only", "personalization.lora.rank": 4},  # stopped early
                       {"objective": 0.9, "instances_done": 1, "instances_total": 4}),
           TrialRecord("t3", {"data": "real_only", "personalization.lora.rank": 8}, {},
                       "RuntimeError: boom")]
    frame = trials_frame(space, opts, rec)
    assert list(frame["status"]) == ["complete", "stopped", "error"]
    best = best_trial(space, frame)
    assert best["trial"] == "t1" and best["params"]["personalization.lora.rank"] == 2  # complete beats stopped
    text = format_trials(space, frame, best)
    assert "best (max retrieval.ndcg): 0.5000" in text and "error: RuntimeError: boom" in text
    assert SweepResult("x", space, frame, best, DataReport()).exit_code == 1
    assert SweepResult("x", space, frame.iloc[:2], best, DataReport()).exit_code == 0


def test_instance_order_alternates_categories():
    from persrep.sweep.trial import instance_order

    assert instance_order({"mug_0": "mug", "mug_1": "mug", "bottle_0": "bottle", "bottle_1": "bottle",
                           "bottle_2": "bottle"}) == ["bottle_0", "mug_0", "bottle_1", "mug_1", "bottle_2"]


# ---------------------------------------------------------------------------------------------
# real sweeps on local Ray
def _units(root: Path, stage: str) -> dict[str, float]:
    """Published units of a stage -> their manifest's mtime."""
    d = root / stage
    return {p.parent.name: p.stat().st_mtime for p in d.glob("*/MANIFEST.json")} if d.is_dir() else {}


@pytest.fixture(scope="module")
def first_sweep(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("sweep") / "root"
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    rc = sweep_job.main(["--space", str(TOY), "--storage", str(root), "--name", "first", *RUN])
    # Tune's MLflow callback sets $MLFLOW_TRACKING_URI process-wide; the sweep must put it back
    assert os.environ.get("MLFLOW_TRACKING_URI") == env_before
    return root, rc


@pytest.mark.ray
def test_grid_sweep_end_to_end(first_sweep):
    root, rc = first_sweep
    assert rc == 0
    out = root / "sweeps" / "toy-first"
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 4 == load_space(str(TOY)).grid_size()  # one trial per grid point
    assert set(trials["status"]) == {"complete"} and set(trials["instances"]) == {4}
    assert sorted(zip(trials["data"], trials["personalization.lora.rank"])) == [
        ("cut_paste", 2), ("cut_paste", 4), ("real_only", 2), ("real_only", 4)]
    # data: cut-and-paste shards for 4 instances, made once before the trials; real-only needs none
    assert len(_units(root, "synthesis")) == 4
    doc = json.loads((out / "sweep.json").read_text())
    assert doc["data"]["planned"]["synthesis"] == 4 and doc["data"]["stages"]["synthesis"]["done"] == 4
    # 4 trials x 4 instances: one adapter and one evaluation each
    assert len(_units(root, "adapters")) == 16 and len(_units(root, "evaluations")) == 16

    # objective = the mean over instances of the per-instance metric in the results
    rows = pd.read_parquet(out / "results.parquet")
    sel = rows[(rows["task"] == "retrieval") & (rows["metric"] == "ndcg") & (rows["scene"] == "all")
               & (rows["model"] == "personalised")]
    per_trial = sel.groupby("trial")["value"].agg(["mean", "count"])
    for _, t in trials.iterrows():
        assert per_trial.loc[t["trial"], "count"] == 4
        assert t["retrieval.ndcg"] == pytest.approx(per_trial.loc[t["trial"], "mean"], abs=1e-12)
    assert trials["retrieval.ndcg"].nunique() > 1  # the swept settings change the outcome
    best = doc["best"]
    assert best["objective"] == pytest.approx(trials["retrieval.ndcg"].max())

    # Tune's own outputs: a trial dir per trial; progress after every instance (running mean)
    dirs = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(dirs) == 4
    prog = pd.read_csv(dirs[0] / "progress.csv")
    assert list(prog["instances_done"]) == [1, 2, 3, 4]
    running = prog["instance_value"].expanding().mean()
    assert prog["objective"].tolist() == pytest.approx(running.tolist())

    # MLflow: one parent run for the sweep, one nested child per trial
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    exp = client.get_experiment_by_name("persrep-local")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("persrep.kind") == "sweep"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["persrep.sweep"] == "toy-first"
    assert parent.data.metrics["best_objective"] == pytest.approx(best["objective"])
    assert parent.data.params["best.personalization.lora.rank"] == str(best["params"]["personalization.lora.rank"])
    assert parent.data.params["sweep.metric"] == "retrieval.ndcg"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4
    assert sorted(c.info.run_name for c in children) == sorted(trials["trial"])
    for c in children:
        assert c.data.params["data"] in ("real_only", "cut_paste")
        assert c.data.params["personalization.lora.rank"] in ("2", "4")
        t = trials[trials["trial"] == c.info.run_name].iloc[0]
        assert c.data.metrics["objective"] == pytest.approx(t["retrieval.ndcg"])
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "tables")} >= {"tables/trials.csv"}


@pytest.mark.ray
def test_second_sweep_generates_nothing_and_agrees(first_sweep):
    root, _ = first_sweep
    before = {s: _units(root, s) for s in ("synthesis", "adapters", "evaluations")}
    rc = sweep_job.main(["--space", str(TOY), "--storage", str(root), "--name", "second", *RUN])
    assert rc == 0
    after = {s: _units(root, s) for s in before}
    assert after == before  # no unit written again, none added
    doc = json.loads((root / "sweeps" / "toy-second" / "sweep.json").read_text())
    assert doc["data"]["already"]["synthesis"] == 4 and doc["data"]["stages"] == {}
    key = ["data", "personalization.lora.rank", "retrieval.ndcg"]
    a = pd.read_csv(root / "sweeps" / "toy-first" / "trials.csv")[key].sort_values(key[:2])
    b = pd.read_csv(root / "sweeps" / "toy-second" / "trials.csv")[key].sort_values(key[:2])
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))


@pytest.mark.ray
def test_optuna_search_with_asha(first_sweep, tmp_path):
    root, _ = first_sweep
    doc = _toy_doc()
    doc.update(search="optuna", num_samples=2, seed=3, early_stopping={"type": "asha", "grace": 1})
    doc["overrides"].pop("personalization.learning_rate")
    doc["space"] = {"generator.types": {"choice": ["real_only", "cut_paste"]},
                    "personalization.learning_rate": {"loguniform": [1e-3, 1e-1]}}
    path = _write(tmp_path, doc, "optuna.yaml")
    syn = _units(root, "synthesis")
    rc = sweep_job.main(["--space", path, "--storage", str(root), "--name", "opt", *RUN])
    assert rc == 0
    out = root / "sweeps" / "optuna-opt"
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 2
    assert trials["personalization.learning_rate"].between(1e-3, 1e-1).all()
    assert trials["personalization.learning_rate"].nunique() == 2  # sampled, not a grid
    assert set(trials["status"]) <= {"complete", "stopped"}
    assert all(1 <= n <= 4 for n in trials["instances"])
    assert json.loads((out / "sweep.json").read_text())["search"] == "optuna"
    assert _units(root, "synthesis") == syn  # the data was there already
    assert any(p.name.startswith("searcher-state") for p in out.iterdir())  # Optuna's state, by Tune
    assert all(math.isfinite(v) for v in trials["retrieval.ndcg"])


@pytest.mark.ray
def test_sweep_whose_trial_fits_no_node_is_refused_before_compute(tmp_path, ray_local, capsys):
    root = tmp_path / "root"
    rc = sweep_job.main(["--space", str(TOY), "--storage", str(root), "--name", "huge", *RUN,
                         "resources.memory_gb.personalization=4000"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "personalization: one unit needs 4000.0 GiB" in err and "resources.memory_gb.personalization" in err
    assert not (root / "synthesis").exists() and not (root / "sweeps").exists()  # nothing computed


def test_sweep_trial_names_what_it_was_not_given():
    """Argument checks are errors that say the fix, not ``assert`` (gone under ``python -O``)."""
    pytest.importorskip("ray")
    from persrep.distributed.sweep import sweep_trial

    with pytest.raises(TypeError, match=r"sweep_trial needs ctx, options: bind them with tune.with_parameters"):
        sweep_trial({"data": "a"}, space=object())
    with pytest.raises(KeyError, match=r"data='b' is not one of the sweep's data options \['a'\]"):
        sweep_trial({"data": "b"}, ctx=object(), space=object(), options={"a": object()})


def test_the_optuna_hint_names_the_version_the_project_needs(tmp_path, monkeypatch):
    import importlib.util as ilu

    from persrep.sweep import space as sp

    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'"{sp.OPTUNA_REQUIREMENT}"' in pyproject, "OPTUNA_REQUIREMENT differs from pyproject.toml"
    real = ilu.find_spec
    monkeypatch.setattr(ilu, "find_spec", lambda name, *a: None if name == "optuna" else real(name, *a))
    doc = _toy_doc()
    doc["search"] = "optuna"
    with pytest.raises(Exception, match=r"pip install 'optuna>=5.0,<6'"):
        load_space(_write(tmp_path, doc))
