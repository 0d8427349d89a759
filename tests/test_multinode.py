"""The whole tiny pipeline on a multi-node ``ray.cluster_utils.Cluster`` with the storage root on S3.

Head + 2 worker nodes (1 CPU each; one worker also has a fake GPU), storage on the moto S3 server
(``AWS_ENDPOINT_URL`` from the ``s3_server`` fixture). The cluster and its driver run in a
subprocess, so they never share a driver with the session's ``ray_local``. The reference is the
single-node run of the same settings (in-process, one torch thread, a local root), which
tests/test_pipeline.py shows equal to a single-node Ray run.

1. the cluster run gives exactly the reference's results.parquet (every value), units and keys;
2. a worker node is removed (``cluster.remove_node``) while a personalisation trial runs on it:
   the trial blocks in a step hook after its first step (and checkpoint) until the node is gone,
   so the fault is deterministic. The run still completes: no unit missing or extra, every
   manifest checksum valid, synthesis rows exactly once, the same results as the reference, and
   the summary names the unit that was retried.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
# tests/test_pipeline.py's tiny settings, one instance per category, a checkpoint every step (so
# a retried trial resumes from a Tune checkpoint), no MLflow (not what is tested here)
TINY = ["data.toy.categories=2", "data.toy.instances_per_category=2", "data.toy.image_size=64",
        "data.toy.test_per_scene=2", "data.toy.negatives_per_category=6", "data.max_instances=1",
        "generator.dreambooth.steps=2", "generator.dreambooth.num_class_images=2",
        "synthesis.num_positives=4", "synthesis.inference_steps=2", "synthesis.resolution=32",
        "personalization.max_steps=3", "personalization.batch_size=4", "personalization.checkpoint_every=1",
        "personalization.backbones=[{name: tf_efficientnet_lite0, weights: offline, image_size: 64}]",
        "evaluation.dense_input_size=64", "tracking.enabled=false"]
STAGES = ("generators", "synthesis", "adapters", "evaluations")
KEY = ["instance", "task", "metric", "scene", "model", "data_config", "backbone"]

CLUSTER_SCRIPT = textwrap.dedent('''
    import functools, json, os, sys, threading, time
    t0 = time.perf_counter()
    import ray
    from ray.cluster_utils import Cluster
    from persrep.config import load_settings
    from persrep.distributed.ray_executor import RayExecutor
    from persrep.pipeline import run_pipeline

    root, marker_dir, mode = sys.argv[1:4]
    overrides = json.loads(sys.argv[4])


    def step_hook(unit, info, *, marker_dir, removable, block):
        """Inside each personalisation trial, after each step: record where it ran; in "remove"
        mode the first trial past step 1 on a worker node blocks there until its node is gone."""
        import ray
        node = ray.get_runtime_context().get_node_id()
        label = f"{unit.config.label}:{unit.backbone.name}:{unit.instance}"
        with open(os.path.join(marker_dir, "steps.jsonl"), "a") as f:
            f.write(json.dumps({"unit": label, "node": node, "step": info["step"], "pid": os.getpid()}) + "\\n")
        if not (block and node in removable and info["step"] == 1):
            return
        try:
            os.close(os.open(os.path.join(marker_dir, "blocked.lock"), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return  # only one trial is ever blocked
        tmp = os.path.join(marker_dir, "blocked.tmp")
        with open(tmp, "w") as f:
            json.dump({"unit": label, "key": unit.key, "node": node, "pid": os.getpid()}, f)
        os.replace(tmp, os.path.join(marker_dir, "blocked.json"))
        deadline = time.time() + 120
        while time.time() < deadline:  # killed with its node; never returns normally
            time.sleep(0.1)
        raise RuntimeError("the blocked trial outlived the removal of its node")


    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cpu_node = cluster.add_node(num_cpus=1)
    gpu_node = cluster.add_node(num_cpus=1, num_gpus=1)
    removed = {}
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        t_up = time.perf_counter() - t0
        nodes = {"head": cluster.head_node.node_id, "cpu": cpu_node.node_id, "gpu": gpu_node.node_id}
        workers = {cpu_node.node_id: cpu_node, gpu_node.node_id: gpu_node}
        hook = functools.partial(step_hook, marker_dir=marker_dir, removable=sorted(workers),
                                 block=mode == "remove")

        def remove_blocked_node():
            path = os.path.join(marker_dir, "blocked.json")
            deadline = time.time() + 300
            while not os.path.exists(path):
                if time.time() > deadline:
                    return
                time.sleep(0.05)
            blocked = json.load(open(path))
            t = time.perf_counter()
            cluster.remove_node(workers[blocked["node"]])
            alive = 3
            while alive != 2 and time.perf_counter() - t < 60:  # until the cluster knows it is gone
                alive = len([n for n in ray.nodes() if n["Alive"]])
                time.sleep(0.1)
            removed.update(blocked, seconds=round(time.perf_counter() - t, 2), alive=alive)
            print(f"removed node {blocked['node']} running {blocked['unit']}", flush=True)

        if mode == "remove":
            threading.Thread(target=remove_blocked_node, daemon=True).start()
        settings = load_settings("local", [*overrides, f"storage.root={root}"])
        said = []

        def say(msg):
            said.append(msg)
            print(msg, flush=True)

        executor = RayExecutor(settings.resources.max_retries, say, step_hook=hook)
        summary = run_pipeline(settings, say, executor, run_id="cluster")
        print("RESULT " + json.dumps({
            "nodes": nodes, "removed": removed, "stages": summary.stages, "failures": summary.failures,
            "retries": summary.retries, "notes": summary.notes, "exit_code": summary.exit_code,
            "timings": summary.timings, "cluster_up_s": round(t_up, 1),
            "said": [m for m in said if "retrying" in m or m.startswith("RETRIED")],
            "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
''')


def _settings(root: str, *extra: str):
    from persrep.config import load_settings

    return load_settings("local", [*TINY, *extra, f"storage.root={root}"])


def _finished(storage) -> dict[str, set[str]]:
    return {stage: set(storage.list_finished(stage)) for stage in STAGES}


def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(KEY).reset_index(drop=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-node run of the same settings: results and the keys of every unit it published."""
    from persrep.pipeline import run_pipeline
    from persrep.storage import Storage

    root = tmp_path_factory.mktemp("single") / "root"
    t0 = time.perf_counter()
    summary = run_pipeline(_settings(str(root)), run_id="single")
    assert summary.exit_code == 0, summary.failures
    frame = pd.read_parquet(root / "runs" / "single" / "results.parquet")
    units = _finished(Storage(str(root)))
    assert [len(units[s]) for s in STAGES] == [1, 2, 3, 4], {s: len(v) for s, v in units.items()}
    return {"frame": _sorted(frame), "units": units, "stages": summary.stages,
            "seconds": time.perf_counter() - t0}


def run_cluster(root: str, marker_dir: Path, mode: str, *extra: str) -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", CLUSTER_SCRIPT, root, str(marker_dir), mode,
                           json.dumps([*TINY, *extra])],
                          env=env, capture_output=True, text=True, timeout=420, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = json.loads(lines[-1][len("RESULT "):])
    res["steps"] = [json.loads(ln) for ln in (marker_dir / "steps.jsonl").read_text().splitlines()]
    return res


def check_storage(storage, reference: dict) -> None:
    """Every unit of the reference and no other; every manifest's checksums hold; rows once."""
    from persrep.generation.shards import read_unit

    units = _finished(storage)
    for stage in STAGES:
        assert units[stage] == reference["units"][stage], f"{stage}: units missing or extra"
        for key in units[stage]:
            storage.verify_unit(stage, key)  # reads every file, raises on a checksum mismatch
    # nothing half-published left beside them (a unit dir without its manifest)
    for stage in STAGES:
        assert set(storage.list_dir(stage)) == units[stage], f"{stage}: unfinished unit dirs left"
    for key in units["synthesis"]:
        idx = [r["index"] for r in read_unit(storage, key, kept_only=False).to_pylist()]
        assert len(idx) == len(set(idx)) == storage.manifest("synthesis", key).meta["rows"], key


@pytest.mark.timeout(900)  # the module reference run + a 3-node cluster subprocess (up to 420 s)
def test_cluster_run_on_s3_equals_single_node(reference, s3_bucket, tmp_path):
    from persrep.storage import Storage

    root = f"s3://{s3_bucket}/mn"
    res = run_cluster(root, tmp_path, "plain")
    assert res["exit_code"] == 0 and res["failures"] == [], res
    assert res["stages"] == reference["stages"]
    storage = Storage(root)
    check_storage(storage, reference)
    got = _sorted(pd.read_parquet(io.BytesIO(storage.read_bytes("runs/cluster/results.parquet"))))
    pd.testing.assert_frame_equal(got, reference["frame"])  # every value, bit for bit
    # placement: the fake GPU drew synthesis (one actor per GPU) and ran every GPU trial
    assert any(n.startswith("synthesis:") and "on 1 actor(s)" in n for n in res["notes"]), res["notes"]
    assert {s["node"] for s in res["steps"]} == {res["nodes"]["gpu"]}, res["steps"]
    print(f"reference {reference['seconds']:.1f} s; 3-node cluster run {res['seconds']:.1f} s "
          f"(cluster up {res['cluster_up_s']} s, stages {res['timings']})")


@pytest.mark.timeout(900)  # the module reference run + a 3-node cluster subprocess (up to 420 s)
def test_worker_node_removed_mid_personalisation_loses_nothing(reference, s3_bucket, tmp_path):
    from persrep.storage import Storage

    root = f"s3://{s3_bucket}/mn"
    # trials on CPUs, so they spread over all three nodes and one can be lost with its node
    res = run_cluster(root, tmp_path, "remove", "resources.gpus_per_trial=0")
    removed = res["removed"]
    assert removed.get("unit"), f"no trial was blocked on a worker node: {res['steps']}"
    assert removed["alive"] == 2 and removed["node"] in (res["nodes"]["cpu"], res["nodes"]["gpu"])
    assert len({s["node"] for s in res["steps"]}) >= 2, res["steps"]  # trials ran on several nodes

    # the run completed, and says what was retried
    assert res["exit_code"] == 0 and res["failures"] == [], res
    assert res["retries"] == [{"stage": "personalization", "unit": removed["unit"], "attempts": 2,
                               "status": "done"}], res["retries"]
    assert res["stages"]["personalization"] == {"done": 3, "skipped": 0, "failed": 0, "retried": 1}
    assert any(m.startswith(f"personalization: retrying {removed['unit']} (attempt 2)") for m in res["said"]), res["said"]
    storage = Storage(root)
    doc = json.loads(storage.read_bytes("runs/cluster/summary.json"))
    assert doc["retries"] == res["retries"] and doc["failures"] == []

    # the retry ran elsewhere and resumed from the Tune checkpoint of the lost attempt
    after = [s for s in res["steps"] if s["unit"] == removed["unit"] and s["pid"] != removed["pid"]]
    assert after and all(s["node"] != removed["node"] for s in after), res["steps"]
    assert min(s["step"] for s in after) == 2, after
    assert storage.manifest("adapters", removed["key"]).meta["resumed_from"] == 1

    # nothing lost, nothing doubled, every checksum valid, the same numbers as the reference
    check_storage(storage, reference)
    got = _sorted(pd.read_parquet(io.BytesIO(storage.read_bytes("runs/cluster/results.parquet"))))
    assert not got.duplicated(KEY).any()
    pd.testing.assert_frame_equal(got, reference["frame"])
    print(f"node removal run {res['seconds']:.1f} s (cluster up {res['cluster_up_s']} s, stages "
          f"{res['timings']}); node removed in {removed['seconds']} s")
