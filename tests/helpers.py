"""Helpers shared by test modules: run ``ray_jobs/run_all.py`` in or out of process, kill a job
with its whole session, read and verify the published units of a storage root.

Moved unchanged from test_faults.py; used by test_faults, test_soak, test_services,
test_bad_inputs and test_security; the image comparisons from test_diffusion and test_dreambooth
(pytest puts tests/ on sys.path: ``from helpers import ...``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from persrep.storage import MANIFEST, Storage

REPO = Path(__file__).resolve().parents[1]
RUN_ALL = REPO / "ray_jobs" / "run_all.py"
UNIT_STAGES = ("generators", "synthesis", "adapters", "evaluations")
RESULT_KEY = ["instance", "task", "metric", "scene", "model", "data_config"]


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


# -- images (test_diffusion, test_dreambooth) ------------------------------------------------------
def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def assert_same_up_to_float_rounding(a, b) -> None:
    """Same noise, same prompt: the same image. Not always bit-identical across batch sizes,
    because BLAS blocks a matmul differently for a batch of 1 and of 4 (seen with 1 thread: one
    value of 12,288 off by one grey level); a different seed changes the mean by ~40 levels."""
    diff = np.abs(pixels(a) - pixels(b))
    assert diff.max() <= 2 and diff.mean() < 0.05, (diff.max(), diff.mean())


_FAST_REFERENCE: dict = {}


def fast_reference(tmp_path_factory) -> dict:
    """An uninterrupted in-process run of worlds.FAST: its units and results (test_faults,
    test_interrupt, test_retry_policy wrap it in a module-scoped ``reference`` fixture). Run once
    per session and shared: its root is only ever read or copied (``shutil.copytree``)."""
    if _FAST_REFERENCE.get("root") is not None and Path(_FAST_REFERENCE["root"]).is_dir():
        return _FAST_REFERENCE
    from persrep.config import load_settings
    from persrep.pipeline import run_pipeline
    from worlds import FAST

    root = tmp_path_factory.mktemp("ref") / "root"
    summary = run_pipeline(load_settings("local", [*FAST, f"storage.root={root}"]), run_id="ref")
    assert summary.exit_code == 0, summary.failures
    _FAST_REFERENCE.update({"root": root, "units": set(unit_manifests(root)), "results": results(root, "ref"),
                            "stages": summary.stages})
    return _FAST_REFERENCE


# -- loopback ports and a moto server on one (conftest, test_services, chaos/soak) -------------------
def free_port() -> int:
    """A port free on loopback right now (not reserved: bind it soon)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(port: int, timeout: float = 60.0):
    """A ``ThreadedMotoServer`` on 127.0.0.1:``port``, started again on the same port after a stop.

    While the server was down an outgoing connection may have taken the port for a moment, and
    moto's ``start()`` then waits forever (its bind fails in a thread it never hears from). So
    wait until the port can be bound (as the server binds it: ``SO_REUSEADDR``), then start it
    and wait for it to answer, for up to ``timeout`` seconds in all."""
    import socket
    import threading

    from moto.server import ThreadedMotoServer

    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
        time.sleep(0.2)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    starter = threading.Thread(target=server.start, daemon=True)
    starter.start()
    starter.join(max(1.0, deadline - time.monotonic()))
    if starter.is_alive():
        raise RuntimeError(f"moto did not start on 127.0.0.1:{port} within {timeout:.0f} s")
    return server
