"""Kill the driver mid-run, start ``ray_jobs/run_all.py`` again: nothing lost, nothing redone.

The job runs as a real subprocess in its own session (so its local Ray cluster, when it starts
one, is in that session too) on the tiny toy world. It is SIGKILLed, with its whole process
group, as soon as a few adapters are published in the storage root; then it is started again
and must finish with every unit present once, every manifest verifying, the units finished
before the kill untouched (same manifest bytes and mtimes), and the same results as an
uninterrupted run. With Ray, no process of the killed job's session may outlive it.

The helpers here are shared with test_soak.py, test_services.py, test_bad_inputs.py and
test_security.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from persrep.config import load_settings
from persrep.pipeline import run_pipeline
from persrep.storage import MANIFEST, Storage

sys.path.insert(0, str(Path(__file__).parent))
from test_pipeline import TINY  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RUN_ALL = REPO / "ray_jobs" / "run_all.py"
UNIT_STAGES = ("generators", "synthesis", "adapters", "evaluations")
# real-only + cut-and-paste: 4 synthesis units, 8 adapters, 9 evaluations; ~10 s in-process
FAST = [*TINY, "generator.types=[real_only, cut_paste]", "evaluation.tasks=[classification, retrieval]",
        "tracking.enabled=false"]
RESULT_KEY = ["instance", "task", "metric", "scene", "model", "data_config"]


# -- helpers (shared with the other fault, service, bad-input and security tests) ----------------
def job_env(**extra: str) -> dict[str, str]:
    """The environment of a run_all subprocess: one thread per process (so numbers equal the
    in-process runs of this test session bit for bit), no inherited Ray address."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)})
    env.update(extra)
    return env


def run_all_main(argv: list[str]) -> int:
    """``ray_jobs/run_all.py``'s ``main`` in this process (ray_jobs is not a package)."""
    import importlib.util

    mod = sys.modules.get("persrep_run_all")
    if mod is None:
        spec = importlib.util.spec_from_file_location("persrep_run_all", RUN_ALL)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        sys.modules["persrep_run_all"] = mod
    return mod.main(argv)


def error_lines(err: str, prefix: str = "run_all:") -> list[str]:
    """The job's error lines (progress lines start with a [time] stamp)."""
    return [ln for ln in err.splitlines() if ln.startswith(prefix)]


def run_all_argv(root: Path | str, run_id: str, *overrides: str, ray: bool = False) -> list[str]:
    argv = [sys.executable, str(RUN_ALL), "--storage", str(root), "--run-id", run_id]
    if not ray:
        argv.append("--no-ray")
    return [*argv, *overrides]


def spawn(argv: list[str], log_dir: Path, name: str, env: dict[str, str]) -> subprocess.Popen:
    """Start a job in its own session (= its own process group); stdout/stderr to files."""
    log_dir.mkdir(parents=True, exist_ok=True)
    out = open(log_dir / f"{name}.out", "wb")  # noqa: SIM115 - closed with the process
    err = open(log_dir / f"{name}.err", "wb")  # noqa: SIM115
    proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env, cwd=str(log_dir),
                            start_new_session=True)
    proc._logs = (out, err)  # type: ignore[attr-defined]
    return proc


def session_pids(sid: int) -> list[int]:
    """Processes whose session id is ``sid`` (everything a job we started in its own session
    started, including a local Ray cluster's GCS, raylet and workers)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 3 and int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(d.name))
    return pids


def kill_job(proc: subprocess.Popen, grace_s: float = 30.0) -> list[int]:
    """SIGKILL the job's process group; wait for its whole session to go. Returns the pids that
    were still alive after ``grace_s`` (then killed one by one: they are ours)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    for f in getattr(proc, "_logs", ()):
        f.close()
    deadline = time.monotonic() + grace_s
    left = session_pids(proc.pid)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = session_pids(proc.pid)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def finish(proc: subprocess.Popen, timeout: float) -> int:
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        kill_job(proc, grace_s=10)  # a no-op when it ended cleanly; never leaves strays
    return rc


def unit_manifests(root: Path) -> dict[str, tuple[bytes, int]]:
    """"stage/key" -> (manifest bytes, manifest mtime_ns) of every published unit."""
    out = {}
    for stage in UNIT_STAGES:
        for man in (root / stage).glob(f"*/{MANIFEST}"):
            out[f"{stage}/{man.parent.name}"] = (man.read_bytes(), man.stat().st_mtime_ns)
    return out


def unit_file_mtimes(root: Path, units) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns
            for u in units for p in (root / u).iterdir() if p.is_file()}


def unit_dirs(root: Path) -> list[str]:
    return sorted(f"{s}/{d.name}" for s in UNIT_STAGES if (root / s).is_dir()
                  for d in (root / s).iterdir() if d.is_dir())


def verify_all(root: Path) -> int:
    """Verify every published unit's checksums (raises on the first bad one); returns the count."""
    st = Storage(str(root))
    n = 0
    for unit in unit_manifests(root):
        stage, key = unit.split("/")
        st.verify_unit(stage, key)
        n += 1
    return n


def wait_for(pred, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the job ended (rc {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def results(root: Path, run_id: str) -> pd.DataFrame:
    frame = pd.read_parquet(root / "runs" / run_id / "results.parquet")
    cols = [*RESULT_KEY, "value"]
    return frame[cols].sort_values(RESULT_KEY).reset_index(drop=True)


def n_published(root: Path, stage: str) -> int:
    return len(list((root / stage).glob(f"*/{MANIFEST}")))


# -- the uninterrupted reference ------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted in-process run of FAST: its units and results."""
    root = tmp_path_factory.mktemp("ref") / "root"
    summary = run_pipeline(load_settings("local", [*FAST, f"storage.root={root}"]), run_id="ref")
    assert summary.exit_code == 0, summary.failures
    return {"root": root, "units": set(unit_manifests(root)), "results": results(root, "ref"),
            "stages": summary.stages}


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
