"""Kill the driver mid-run, start ``ray_jobs/run_all.py`` again: nothing lost, nothing redone.

The job runs as a real subprocess in its own session (so its local Ray cluster, when it starts
one, is in that session too) on the tiny toy world. It is SIGKILLed, with its whole process
group, as soon as a few adapters are published in the storage root; then it is started again
and must finish with every unit present once, every manifest verifying, the units finished
before the kill untouched (same manifest bytes and mtimes), and the same results as an
uninterrupted run. With Ray, no process of the killed job's session may outlive it.

The helpers it shares with test_soak.py, test_services.py, test_bad_inputs.py and
test_security.py are in tests/helpers.py.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from persrep.config import load_settings
from persrep.pipeline import run_pipeline
from persrep.storage import MANIFEST, Storage

sys.path.insert(0, str(Path(__file__).parent))
# all the moved helpers stay importable from here (other branches' tests may still do that)
from helpers import (REPO, fast_reference, RESULT_KEY, RUN_ALL, UNIT_STAGES, error_lines, finish,  # noqa: E402,F401
                     job_env, kill_job, n_published, results, run_all_argv, run_all_main,
                     session_pids, spawn, unit_dirs, unit_file_mtimes, unit_manifests, verify_all,
                     wait_for)
from worlds import FAST, TINY  # noqa: E402,F401


# -- the uninterrupted reference ------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted in-process run of FAST: its units and results."""
    return fast_reference(tmp_path_factory)


def _kill_then_resume(tmp_path: Path, reference, ray: bool, at_adapters: int) -> dict:
    root = tmp_path / "root"
    env = job_env()  # with Ray, the job starts its own local cluster under $RAY_TMPDIR
    extra = [*FAST, "resources.num_cpus=2"] if ray else FAST
    proc = spawn(run_all_argv(root, "killed", *extra, ray=ray), tmp_path / "logs", "killed", env)
    try:
        wait_for(lambda: n_published(root, "adapters") >= at_adapters, 240,
                 f"{at_adapters} published adapters", proc)
    finally:
        strays = kill_job(proc)
    assert proc.returncode == -signal.SIGKILL
    assert strays == [], f"processes of the killed job outlived it: {strays}"
    before = unit_manifests(root)
    n_adapters = sum(u.startswith("adapters/") for u in before)
    assert at_adapters <= n_adapters < reference["stages"]["personalization"]["done"], \
        f"the kill came too late: {n_adapters} adapters were already published"
    assert not (root / "runs" / "killed" / "summary.json").exists()
    mtimes = unit_file_mtimes(root, before)

    again = spawn(run_all_argv(root, "resumed", *extra, ray=ray), tmp_path / "logs", "resumed", env)
    rc = finish(again, timeout=400)
    err = (tmp_path / "logs" / "resumed.err").read_text()
    assert rc == 0, err[-3000:]
    doc = json.loads((root / "runs" / "resumed" / "summary.json").read_text())

    # nothing missing, nothing twice, nothing half-written left behind, every checksum valid
    after = unit_manifests(root)
    assert set(after) == reference["units"]
    assert unit_dirs(root) == sorted(after)
    assert verify_all(root) == len(reference["units"])
    # what was finished before the kill was skipped, not recomputed: same bytes, same mtimes
    assert {u: after[u] for u in before} == before
    assert unit_file_mtimes(root, before) == mtimes
    pz = doc["stages"]["personalization"]
    assert pz["skipped"] == n_adapters and pz["done"] == len([u for u in after if u.startswith("adapters/")]) - n_adapters
    assert doc["failures"] == [] and doc.get("retries", []) == []
    # the same results as the uninterrupted run, each row once
    res = results(root, "resumed")
    assert not res.duplicated(RESULT_KEY).any()
    pd.testing.assert_frame_equal(res, reference["results"], check_exact=True)
    return {"before": len(before), "adapters_before": n_adapters, "stderr": err}


@pytest.mark.slow
def test_driver_killed_mid_run_then_rerun_completes_without_ray(tmp_path, reference):
    _kill_then_resume(tmp_path, reference, ray=False, at_adapters=2)


@pytest.mark.slow
def test_driver_with_local_ray_killed_mid_run_then_rerun_completes(tmp_path, reference, monkeypatch):
    """The driver started a local Ray cluster: killing its process group takes the cluster
    with it, and the re-run restores the Tune experiment without retrying finished units."""
    ray_tmp = tempfile.mkdtemp(prefix="prf-", dir="/tmp")  # short: Ray's socket paths
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    try:
        out = _kill_then_resume(tmp_path, reference, ray=True, at_adapters=2)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert "retrying" not in out["stderr"], out["stderr"][-3000:]


def test_corrupted_finished_units_are_detected_and_recomputed(tmp_path, reference):
    """A finished unit whose bytes no longer match its manifest (a flipped byte, a deleted file,
    a torn manifest) is not skipped: the re-run unpublishes and recomputes exactly those units."""
    root = tmp_path / "root"
    shutil.copytree(reference["root"], root)
    units = sorted(reference["units"])
    adapter = next(u for u in units if u.startswith("adapters/"))
    shard = next(u for u in units if u.startswith("synthesis/"))
    evaluation = next(u for u in units if u.startswith("evaluations/"))
    f = root / adapter / "adapter.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    next((root / shard).glob("part-*.parquet")).unlink()
    man = root / evaluation / MANIFEST
    man.write_bytes(man.read_bytes()[:40])
    before = unit_manifests(root)

    summary = run_pipeline(load_settings("local", [*FAST, f"storage.root={root}"]), run_id="repaired")
    assert summary.exit_code == 0, summary.failures
    assert sum(c["done"] for c in summary.stages.values()) == 3, summary.stages
    after = unit_manifests(root)
    assert set(after) == reference["units"] and verify_all(root) == len(units)
    changed = {u for u in units if u not in before or after[u] != before[u]}
    assert changed == {adapter, shard, evaluation}
    pd.testing.assert_frame_equal(results(root, "repaired"), reference["results"], check_exact=True)


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_is_intact_unpublishes_a_corrupt_unit_so_it_can_be_published_again(backend, tmp_path, request):
    root = str(tmp_path / "root") if backend == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/p"
    st = Storage(root)
    st.publish("adapters", "k1", {"adapter.safetensors": b"weights", "metrics.json": b"{}"})
    assert st.is_intact("adapters", "k1")
    st.write_bytes("adapters/k1/adapter.safetensors", b"tampered")
    assert not st.is_intact("adapters", "k1") and not st.is_finished("adapters", "k1")
    st.publish("adapters", "k1", {"adapter.safetensors": b"weights", "metrics.json": b"{}"})
    assert st.is_intact("adapters", "k1") and st.verify_unit("adapters", "k1").files
    assert not st.is_intact("adapters", "never-published")
