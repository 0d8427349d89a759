"""Memory-aware scheduling (persrep.pipeline.memory): estimates from the real architectures, the
plan printed before compute, a unit that fits nowhere refused in one line, and on a Ray cluster
whose node declares little memory, heavy units that do not fit together run one after the other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from persrep.config import load_settings
from persrep.pipeline.memory import (GIB, InsufficientResourcesError, NodeShape, backbone_size,
                                     estimate_stage, plan_stages, stage_requests)

REPO = Path(__file__).resolve().parents[1]


def test_parameter_counts_are_the_real_architectures():
    # published sizes: DINOv2 ViT-B/14 86.6 M, ViT-B/16 86.6 M (without heads)
    params, acts = backbone_size("vit_base_patch14_dinov2.lvd142m", "timm/x", 224)
    assert abs(params - 86_580_480) / 86_580_480 < 0.01 and acts > 0
    lite, lite_acts = backbone_size("tf_efficientnet_lite0", "offline", 224)
    assert 3.0e6 < lite < 3.7e6  # EfficientNet-Lite0 without its classifier: 3.37 M
    # activations grow with the input area (a meta-device forward, not a table)
    _, small = backbone_size("tf_efficientnet_lite0", "offline", 112)
    assert 3.5 < lite_acts / small < 4.5


def test_estimate_matches_the_measured_sd15_dreambooth_step():
    # ../shared/docs/ENVIRONMENT.md (not in this repository): a full SD 1.5-size DreamBooth step
    # (UNet + text encoder, prior preservation, tiny resolution) peaked at 15.8 GB RSS on CPU. The
    # estimate must cover it, not by much.
    s = load_settings("paper", ["generator.dreambooth.resolution=64"])
    est = estimate_stage(s, "generator_prep")
    assert 15.8 <= est.gb <= 15.8 * 1.25, est.describe()
    assert set(est.parts) >= {"weights", "gradients", "optimiser", "activations", "process"}
    lora = estimate_stage(load_settings("paper", ["generator.dreambooth.resolution=64",
                                                  "generator.dreambooth.use_lora=true"]), "generator_prep")
    assert lora.gb < est.gb / 2  # no full gradients or AdamW state


def test_overrides_and_the_plan():
    s = load_settings("local", ["resources.memory_gb.personalization=3"])
    est = estimate_stage(s, "personalization")
    assert est.gb == 3.0 and est.describe() == "3.0 GiB (resources.memory_gb.personalization)"
    node = NodeShape(cpus=8, gpus=0, memory_gb=10)
    [plan] = plan_stages(s, {"personalization": 5}, [node], {"personalization": (1.0, 0.0)}, False)
    assert plan.per_node == 3  # memory, not CPUs, bounds it
    assert plan.line().startswith("plan personalization: 5 unit(s), each 1 CPU and 3.0 GiB")
    s.resources.memory_gb.personalization = 16
    with pytest.raises(InsufficientResourcesError, match=r"personalization: one unit needs 16.0 GiB .* "
                       r"largest node offers 10.0 GiB .* resources.memory_gb.personalization"):
        plan_stages(s, {"personalization": 5}, [node], {"personalization": (1.0, 0.0)}, False)
    # an *estimate* a little above what Ray offers runs alone on the node, and the plan says so
    paper = load_settings("paper", ["generator.dreambooth.resolution=64"])
    [plan] = plan_stages(paper, {"generator_prep": 2}, [NodeShape(2, 0, 14.0)], {"generator_prep": (1.0, 0.0)}, False)
    assert plan.per_node == 1 and plan.estimate.gb == 14.0 and "the whole node" in plan.line()
    # ... also when Ray's figure for the node is not a round number (rounded up, it fitted nowhere)
    [plan] = plan_stages(paper, {"generator_prep": 1}, [NodeShape(2, 0, 15.996)], {"generator_prep": (1.0, 0.0)}, False)
    assert plan.per_node == 1 and plan.estimate.bytes <= 15.996 * 1024 ** 3


def test_fractional_tune_trial_gpus_are_what_the_plan_counts():
    """Personalisation units are Tune trials that reserve ``gpus_per_tune_trial`` (several per GPU);
    the plan must count them that way, not at ``gpus_per_trial`` (one per GPU)."""
    from persrep.distributed.tune_stage import trial_resources

    s = load_settings("local", ["resources.gpus_per_tune_trial=0.25", "resources.memory_gb.personalization=2",
                                "resources.memory_gb.generator_prep=2"])
    req = stage_requests(s, has_gpus=True)
    assert req["personalization"] == (1.0, 0.25) and req["generator_prep"] == (1.0, 1.0)
    assert trial_resources(s, gpus_in_cluster=1)["gpu"] == 0.25  # what Tune reserves: the same figure
    node = NodeShape(cpus=16, gpus=1, memory_gb=64)
    plans = {p.stage: p for p in plan_stages(s, {"personalization": 8, "generator_prep": 2}, [node], req, True)}
    assert plans["personalization"].per_node == 4 and plans["generator_prep"].per_node == 1
    assert "0.25 GPU" in plans["personalization"].line()
    # without a GPU on any node nothing asks for one; unset, a trial takes gpus_per_trial
    assert stage_requests(s, has_gpus=False)["personalization"] == (1.0, 0.0)
    assert stage_requests(load_settings("local", []), has_gpus=True)["personalization"] == (1.0, 1.0)
    cpu_trials = load_settings("local", ["resources.gpus_per_trial=0"])
    assert stage_requests(cpu_trials, has_gpus=True)["personalization"] == (1.0, 0.0)
    assert "gpu" not in trial_resources(cpu_trials, gpus_in_cluster=1)


CLUSTER_SCRIPT = textwrap.dedent('''
    import json, sys
    import ray
    from ray.cluster_utils import Cluster
    from persrep.config import load_settings
    from persrep.distributed.ray_executor import RayExecutor
    from persrep.pipeline import run_pipeline
    from persrep.pipeline.memory import InsufficientResourcesError

    root, overrides = sys.argv[1], json.loads(sys.argv[2])
    GIB = 1024 ** 3
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "memory": 4 * GIB, "object_store_memory": 200 * 1024 ** 2, "include_dashboard": False})
    out = {}
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        said = []
        # a unit that fits on no node: refused before any compute
        try:
            run_pipeline(load_settings("local", overrides + ["resources.memory_gb.generator_prep=7"]),
                         said.append, RayExecutor(2, said.append), run_id="too-big")
            out["too_big"] = None
        except InsufficientResourcesError as exc:
            out["too_big"] = str(exc)
        out["generators_after_refusal"] = __import__("os").path.exists(root + "/generators")
        said.clear()
        summary = run_pipeline(load_settings("local", overrides), said.append, RayExecutor(2, said.append),
                               run_id="fits")
        from persrep.storage import Storage
        st = Storage(root)
        out.update(exit_code=summary.exit_code, retries=summary.retries, failures=summary.failures,
                   plan=[m for m in said if m.startswith("plan ")],
                   generators=[st.manifest("generators", k).meta for k in st.list_finished("generators")])
    finally:
        ray.shutdown()
        cluster.shutdown()
    print("RESULT " + json.dumps(out, default=str))
''')


@pytest.mark.ray
@pytest.mark.slow
def test_units_that_do_not_fit_together_run_one_after_the_other(tmp_path):
    overrides = ["data.toy.categories=1", "data.toy.instances_per_category=2", "data.toy.image_size=64",
                 "data.toy.test_per_scene=2", "data.toy.negatives_per_category=6", "data.toy.dense_per_instance=0",
                 "generator.types=[dreambooth]", "generator.dreambooth.steps=6",
                 "generator.dreambooth.num_class_images=2", "synthesis.num_positives=4",
                 "synthesis.inference_steps=2", "synthesis.resolution=32", "personalization.max_steps=2",
                 "personalization.batch_size=4", "evaluation.tasks=[classification]", "tracking.enabled=false",
                 "personalization.backbones=[{name: tf_efficientnet_lite0, weights: offline, image_size: 64}]",
                 # 2 CPUs would run both DreamBooth units at once; 3 of the node's 4 GiB each cannot
                 "resources.cpus_per_trial=0.5", "resources.cpus_per_actor=0.5",
                 "resources.memory_gb.generator_prep=3", "resources.memory_gb.synthesis=1",
                 "resources.memory_gb.personalization=1", "resources.memory_gb.evaluation=1",
                 f"storage.root={tmp_path / 'root'}"]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", CLUSTER_SCRIPT, str(tmp_path / "root"), json.dumps(overrides)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["too_big"].startswith("generator_prep: one unit needs 7.0 GiB (resources.memory_gb.generator_prep)")
    assert not out["generators_after_refusal"]  # refused before any unit ran
    assert out["exit_code"] == 0 and out["retries"] == [] and out["failures"] == []
    assert any(p.startswith("plan generator_prep: 2 unit(s), each 0.5 CPU and 3.0 GiB") and
               p.endswith("up to 1 at once on the largest node") for p in out["plan"]), out["plan"]
    spans = sorted((g["started_at"], g["finished_at"]) for g in out["generators"])
    assert len(spans) == 2 and spans[0][1] <= spans[1][0], spans  # one after the other


@pytest.mark.ray
@pytest.mark.slow
def test_run_all_refuses_a_unit_that_fits_nowhere_before_the_first_unit_computes(tmp_path):
    """The job's executor plans when the first unit is left to compute (a finished re-run starts
    no cluster); a unit that fits on no node is still refused before any unit computes: exit 2,
    one line naming the setting, nothing published."""
    sys.path.insert(0, str(REPO / "tests"))
    from helpers import UNIT_STAGES, error_lines, job_env, n_published, run_all_argv
    from worlds import FAST

    root = tmp_path / "root"
    argv = run_all_argv(root, "big", *FAST, "resources.num_cpus=2", "resources.memory_gb.evaluation=4000", ray=True)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=job_env(), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "resources.memory_gb.evaluation" in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "ray: started a local Ray cluster" in proc.stderr  # refused by the plan made at the start
    assert sum(n_published(root, s) for s in UNIT_STAGES) == 0
    assert not (root / "runs" / "big" / "summary.json").exists()
    assert not (root / ".lock" / "job.json").exists()  # the lock released on the way out
