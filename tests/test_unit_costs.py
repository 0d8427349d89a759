"""summary.json records seconds and peak memory per stage and unit type (in-process and Ray), and
a re-run of a finished job launches no unit: published units are skipped on the driver."""

import json

import pandas as pd
import psutil
import pytest

from persrep.config import load_settings
from persrep.pipeline import run_pipeline
from persrep.pipeline.executor import Executor, LocalExecutor
from persrep.pipeline.unit_stats import Measured, stage_costs

TINY = ["data.toy.categories=2", "data.toy.instances_per_category=2", "data.toy.image_size=64",
        "data.toy.test_per_scene=2", "data.toy.negatives_per_category=6",
        "generator.types=[real_only, cut_paste]",
        "synthesis.num_positives=4", "synthesis.resolution=32",
        "personalization.max_steps=2", "personalization.batch_size=4",
        "personalization.backbones=[{name: tf_efficientnet_lite0, weights: offline, image_size: 64}]",
        "evaluation.dense_input_size=64", "evaluation.tasks=[classification, retrieval]"]
MACHINE = psutil.virtual_memory().total


def _settings(root):
    return load_settings("local", [*TINY, f"storage.root={root}"])


class Counting(Executor):
    """An executor that records which units reach it (wraps a real one; declares the inner
    executor's stage runners, as executors do: persrep.pipeline.executor.Executor.stage_runner)."""

    def __init__(self, inner):
        self.inner, self.mapped = inner, []
        self.sequential, self.max_retries = inner.sequential, inner.max_retries

    def node_shapes(self):
        return self.inner.node_shapes()

    def stage_runner(self, stage):
        return self.inner.stage_runner(stage)

    def map(self, fn, ctx, units, labels, resources, stage):
        self.mapped += [(stage, label) for label in labels]
        return self.inner.map(fn, ctx, units, labels, resources, stage)


def _check_costs(doc, stages, unit_types):
    costs = doc["costs"]
    for stage in stages:
        assert stage in costs, (stage, list(costs))
        assert costs[stage]["stage_seconds"] > 0
    for stage, utype in unit_types:
        t = costs[stage]["unit_types"][utype]
        assert t["units_run"] >= 1 and t["failed"] == 0
        assert 0 < t["seconds_max"] <= t["seconds_sum"] <= costs[stage]["stage_seconds"] * t["units_run"] + 1
        assert 50e6 < t["peak_rss_max_bytes"] < MACHINE, t  # a torch process: > 50 MB, < the machine
        assert t["peak_rss_max_gb"] == pytest.approx(t["peak_rss_max_bytes"] / 1024 ** 3, abs=1e-3)


@pytest.mark.slow
def test_costs_in_summary_and_rerun_launches_nothing(tmp_path):
    root = tmp_path / "root"
    ex = Counting(LocalExecutor())
    first = run_pipeline(_settings(root), executor=ex, run_id="first")
    assert first.exit_code == 0, first.failures
    doc = json.loads((root / "runs" / "first" / "summary.json").read_text())
    _check_costs(doc, ["synthesis", "personalization", "evaluation"],
                 [("evaluation", "pretrained"), ("evaluation", "adapter"),
                  ("personalization", "cut_paste"), ("personalization", "real_only"),
                  ("synthesis", "pos")])
    assert doc["costs"]["evaluation"]["unit_types"]["adapter"]["units_run"] == 8
    units = json.loads((root / "runs" / "first" / "units.json").read_text())
    assert all(u["peak_rss_bytes"] > 0 for u in units if u["status"] == "done")
    # re-run: every unit is published, so none reaches the executor, and the costs say so
    ex2 = Counting(LocalExecutor())
    again = run_pipeline(_settings(root), executor=ex2, run_id="second")
    assert all(c["done"] == 0 for c in again.stages.values()), again.stages
    # in-process synthesis units skip themselves (their skip result carries the unit's counts)
    assert {stage for stage, _ in ex2.mapped} <= {"synthesis"}, ex2.mapped
    doc2 = json.loads((root / "runs" / "second" / "summary.json").read_text())
    ev = doc2["costs"]["evaluation"]["unit_types"]
    assert ev["adapter"]["skipped"] == 8 and ev["adapter"]["units_run"] == 0
    assert ev["adapter"]["peak_rss_max_bytes"] is None


def test_measured_unit_reports_its_own_peak():
    import numpy as np

    def unit(ctx, n):
        a = np.ones(n, dtype=np.uint8)  # touch n bytes
        return {"status": "done", "sum": int(a.sum())}

    small = Measured(unit)(None, 1_000)
    big = Measured(unit)(None, 400_000_000)
    assert big["sum"] == 400_000_000 and small["unit_seconds"] >= 0
    if big["peak_rss_scope"] == "unit":  # Linux: the peak is reset per unit, so the small one is lower
        assert big["peak_rss_bytes"] - small["peak_rss_bytes"] > 300_000_000
        again = Measured(unit)(None, 1_000)
        assert again["peak_rss_bytes"] < big["peak_rss_bytes"] - 300_000_000
    costs = stage_costs([{"stage": "s", "label": "a:x", "status": "done", "seconds": 2.0, "peak_rss_bytes": 10},
                         {"stage": "s", "label": "a:y", "status": "done", "seconds": 3.0, "peak_rss_bytes": 30},
                         {"stage": "s", "label": "b:y", "status": "skipped", "seconds": 0.0, "peak_rss_bytes": None}],
                        {"s": 4.0})
    a = costs["s"]["unit_types"]["a"]
    assert (a["units_run"], a["seconds_sum"], a["seconds_max"], a["peak_rss_max_bytes"]) == (2, 5.0, 3.0, 30)
    assert costs["s"]["unit_types"]["b"]["skipped"] == 1 and costs["s"]["stage_seconds"] == 4.0


@pytest.mark.ray
@pytest.mark.slow
def test_costs_on_ray_and_rerun_launches_no_task(tmp_path, ray_local):
    from persrep.distributed.ray_executor import RayExecutor

    root = tmp_path / "root"
    ex = Counting(RayExecutor(max_retries=1))
    first = run_pipeline(_settings(root), executor=ex, run_id="first")
    assert first.exit_code == 0, first.failures
    doc = json.loads((root / "runs" / "first" / "summary.json").read_text())
    # evaluation: Ray tasks; personalisation: Tune trials; each measured in its own process
    _check_costs(doc, ["personalization", "evaluation"],
                 [("evaluation", "pretrained"), ("evaluation", "adapter"),
                  ("personalization", "cut_paste"), ("personalization", "real_only")])
    assert [s for s, _ in ex.mapped].count("evaluation") == 9
    ex2 = Counting(RayExecutor(max_retries=1))
    again = run_pipeline(_settings(root), executor=ex2, run_id="second")
    assert all(c["done"] == 0 for c in again.stages.values()), again.stages
    assert ex2.mapped == []  # no Ray task launched for a finished unit

    # the job's executor is lazy (``start``: the cluster's start, at the first unit to compute):
    # with every unit published it neither starts a cluster nor makes the memory plan
    calls, said = [], []
    lazy = RayExecutor(max_retries=1, progress=said.append, start=lambda: calls.append("start"))
    third = run_pipeline(_settings(root), said.append, executor=lazy, run_id="third")
    assert calls == [] and not lazy.started, said
    assert not [m for m in said if m.startswith("plan ")], said
    assert any(m.startswith("nothing to compute") for m in said), said
    assert all(c["done"] == 0 and c["failed"] == 0 for c in third.stages.values()), third.stages
    # one unit left to compute: the cluster starts once, the plan is made before that unit runs
    ev = sorted((root / "evaluations").glob("*/MANIFEST.json"))
    assert ev, "no published evaluation"
    ev[0].unlink()
    log = []  # progress lines and the cluster's start, in order
    lazy = RayExecutor(max_retries=1, progress=log.append, start=lambda: log.append("START"))
    fourth = run_pipeline(_settings(root), log.append, executor=lazy, run_id="fourth")
    assert fourth.exit_code == 0 and fourth.stages["evaluation"]["done"] == 1, fourth.stages
    assert log.count("START") == 1 and lazy.started, log
    first_plan = next(i for i, m in enumerate(log) if m.startswith("plan "))
    first_unit = next(i for i, m in enumerate(log) if m.startswith("evaluation: ") and m.endswith("-> done"))
    assert log.index("START") < first_plan < first_unit, log
    assert not any(m.startswith("nothing to compute") for m in log), log
    for run in ("third", "fourth"):  # the same results as the run that computed everything
        a = pd.read_parquet(root / "runs" / "first" / "results.parquet")
        b = pd.read_parquet(root / "runs" / run / "results.parquet")
        assert a.drop(columns=["run_id"], errors="ignore").equals(b.drop(columns=["run_id"], errors="ignore")), run
