"""``run_all`` and ``sweep`` from a directory other than the repo root, with relative paths in
the settings, on a Ray cluster whose workers start in yet another directory (issue #20).

The cluster (``ray.cluster_utils.Cluster``, head + one worker node) is started by a helper
process whose working directory is ``cluster_home``; Ray workers start in their raylet's
directory, not the driver's (checked here first). The user's directory holds the data set, the
negatives, the backgrounds and the sweep space, all named relatively; the storage root is the
relative ``out``. Everything must resolve on the driver: the job and the sweep finish with no
failed unit, and nothing is written relative to the workers' directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[1]
CLUSTER = textwrap.dedent('''
    import os, sys, time
    from ray.cluster_utils import Cluster
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                      "temp_dir": sys.argv[2]})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    tmp = sys.argv[1] + ".tmp"
    open(tmp, "w").write(c.address)
    os.replace(tmp, sys.argv[1])
    try:
        while not os.path.exists(sys.argv[1] + ".stop"):
            time.sleep(0.2)
    finally:
        c.shutdown()
''')
SETTINGS = ["personalization.negatives=external", "personalization.external_negatives=my_negatives",
            "generator.cut_paste.backgrounds=my_backgrounds", "generator.types=[real_only, cut_paste]",
            "synthesis.num_positives=3", "synthesis.resolution=32", "personalization.max_steps=1",
            "personalization.batch_size=4", "evaluation.tasks=[classification]", "tracking.enabled=false",
            "personalization.backbones=[{name: tf_efficientnet_lite0, weights: offline, image_size: 64}]",
            "resources.gpus_per_trial=0"]
SPACE = textwrap.dedent('''
    config: local
    overrides:
      personalization.negatives: external
      personalization.external_negatives: my_negatives
      generator.cut_paste.backgrounds: my_backgrounds
      generator.types: [cut_paste]
      synthesis.num_positives: 3
      synthesis.resolution: 32
      personalization.max_steps: 1
      personalization.batch_size: 4
      evaluation.tasks: [classification, retrieval]
      tracking.enabled: false
      personalization.backbones: [{name: tf_efficientnet_lite0, weights: offline, image_size: 64}]
      resources.gpus_per_trial: 0
    metric: retrieval.ndcg
    mode: max
    search: grid
    space:
      personalization.lora.rank: {grid: [2, 4]}
''')


def _images(folder: Path, n: int, seed: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_run_all_and_sweep_from_another_directory_on_a_cluster_started_elsewhere(tmp_path):
    home, user = tmp_path / "cluster_home", tmp_path / "user"
    home.mkdir()
    user.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    ray_tmp = tempfile.mkdtemp(prefix="pre-", dir="/tmp")  # short: Ray's socket paths
    addr = tmp_path / "address"
    cluster = subprocess.Popen([sys.executable, "-c", CLUSTER, str(addr), ray_tmp], cwd=home, env=env,
                               stdout=open(tmp_path / "cluster.log", "wb"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not addr.exists():
            assert cluster.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "cluster.log").read_text()[-3000:]
            time.sleep(0.3)
        jenv = {**env, "RAY_ADDRESS": addr.read_text()}
        # the premise: a worker's working directory is the cluster's, not the driver's
        probe = subprocess.run([sys.executable, "-c", "import os, ray; ray.init(log_to_driver=False); "
                                "print(ray.get(ray.remote(lambda: os.getcwd()).remote()))"],
                               cwd=user, env=jenv, capture_output=True, text=True, timeout=120)
        assert probe.stdout.strip().splitlines()[-1:] == [str(home)], probe.stdout + probe.stderr[-2000:]

        toy = subprocess.run([sys.executable, "-m", "persrep.cli", "data", "toy", "mydata", "categories=1",
                              "instances_per_category=2", "image_size=64", "test_per_scene=1",
                              "negatives_per_category=3", "dense_per_instance=0"],
                             cwd=user, env=env, capture_output=True, text=True, timeout=300)
        assert toy.returncode == 0, toy.stdout + toy.stderr[-2000:]
        _images(user / "my_negatives", 4, 0)
        _images(user / "my_backgrounds", 3, 1)
        (user / "myspace.yaml").write_text(SPACE)

        job = subprocess.run([sys.executable, str(REPO / "ray_jobs" / "run_all.py"), "--data", "mydata",
                              "--storage", "out", *SETTINGS], cwd=user, env=jenv, capture_output=True,
                             text=True, timeout=600)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "FAILED" not in job.stdout and "attached to the Ray cluster" in job.stderr
        adapters = [d for d in (user / "out" / "adapters").iterdir() if (d / "MANIFEST.json").exists()]
        assert len(adapters) == 4  # 2 instances x (real-only, cut-and-paste)

        sweep = subprocess.run([sys.executable, str(REPO / "ray_jobs" / "sweep.py"), "--space", "myspace.yaml",
                                "--data", "mydata", "--storage", "out", "--name", "elsewhere"],
                               cwd=user, env=jenv, capture_output=True, text=True, timeout=600)
        assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]
        sweeps = list((user / "out" / "sweeps").glob("*elsewhere*/sweep.json"))
        assert len(sweeps) == 1
        trials = __import__("json").loads(sweeps[0].read_text())["trials"]
        assert len(trials) == 2 and all(t.get("status", "TERMINATED") != "ERROR" for t in trials), trials
        # nothing resolved against the workers' directory, nothing against the repo root
        assert sorted(p.name for p in home.iterdir()) == []
        assert not (REPO / "out").exists() and not (REPO / "my_negatives").exists()
    finally:
        addr.with_name("address.stop").touch()
        try:
            cluster.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(cluster.pid, 9)
            cluster.wait()
        import shutil

        shutil.rmtree(ray_tmp, ignore_errors=True)
