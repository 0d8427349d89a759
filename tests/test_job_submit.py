"""``ray job submit -- python ray_jobs/run_all.py`` for real, against a head this module starts.

The head (``ray start --head --block``, dashboard + job server, auth off for this test's own
head) runs in its own process group on ports picked free here and a short temp dir of its own,
so it cannot collide with other clusters on the machine. It is stopped by PID: its process group,
every descendant of ``ray start`` and any process whose command line names its temp dir. Never
``ray stop``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path

import pandas as pd
import pytest
from worlds import ONE_INSTANCE

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# tests/test_pipeline.py's tiny world, cut down to what this test is about (the job plumbing; the
# whole pipeline on a cluster is tests/test_multinode.py): one instance, no DreamBooth, no dense tasks
TINY = ONE_INSTANCE


# -- ports and processes ---------------------------------------------------------------------
def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on loopback right now (held open together while picking)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port_range(width: int, taken: set[int]) -> int:
    """The first port of ``width`` consecutive free ports, below the kernel's ephemeral range."""
    rng = random.Random(os.getpid() ^ time.time_ns())
    for _ in range(200):
        base = rng.randrange(12000, 30000 - width)
        ports = range(base, base + width)
        if taken & set(ports):
            continue
        try:
            held = []
            for p in ports:
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError(f"no {width} consecutive free ports found for the Ray workers")


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = defaultdict(list)
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
                out[int(stat.rsplit(")", 1)[1].split()[1])].append(int(d))
            except (OSError, IndexError, ValueError):
                continue
    return out


def descendants(pid: int) -> set[int]:
    kids, out, stack = _children(), set(), [pid]
    while stack:
        for c in kids.get(stack.pop(), []):
            if c not in out:
                out.add(c)
                stack.append(c)
    return out


def mentioning(text: str) -> set[int]:
    """PIDs whose command line contains ``text`` (our head's unique temp dir)."""
    out = set()
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                if text in Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    out.add(int(d))
            except OSError:
                continue
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purpose
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_head(proc: subprocess.Popen, temp_dir: str, grace_s: float = 5.0, kill_wait_s: float = 20.0) -> list[int]:
    """Stop our head by PID: SIGTERM its group and everything it started, then SIGKILL stragglers.
    Returns the PIDs still alive ``kill_wait_s`` after the first SIGKILL (none, normally)."""
    pids = (descendants(proc.pid) | mentioning(temp_dir) | {proc.pid}) - {os.getpid()}
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + grace_s
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    # SIGKILL is not instant: a process being torn down (large memory, a write in progress) stays
    # visible for a moment, and the raylet may have forked one more worker meanwhile. Kill again
    # whatever is still there until none is, for up to ``kill_wait_s``; return what outlived it.
    left: list[int] = []
    deadline = time.time() + kill_wait_s
    while True:
        left = [p for p in pids | descendants(proc.pid) | mentioning(temp_dir) if _alive(p) and p != os.getpid()]
        if not left or time.time() > deadline:
            break
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    return left


@pytest.fixture(scope="module")
def head():
    """A Ray head of our own: dashboard/job server on, auth off, every port chosen free."""
    from ray.job_submission import JobSubmissionClient

    temp_dir = tempfile.mkdtemp(prefix="prjs", dir="/tmp")  # short: Unix socket paths <= 107 chars
    names = ["port", "dashboard-port", "ray-client-server-port", "node-manager-port", "object-manager-port",
             "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
             "metrics-export-port"]
    ports = dict(zip(names, free_ports(len(names))))
    workers = free_port_range(100, set(ports.values()))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # the job's `python` is ours
    env.pop("RAY_ADDRESS", None)
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--temp-dir={temp_dir}",
           "--num-cpus=2", "--num-gpus=0", "--object-store-memory=300000000", "--disable-usage-stats",
           f"--min-worker-port={workers}", f"--max-worker-port={workers + 99}",
           *[f"--{k}={v}" for k, v in ports.items()]]
    log = open(Path(temp_dir) / "ray-start.log", "wb")  # noqa: SIM115 - closed in teardown
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{ports['dashboard-port']}"
    info = {"proc": proc, "temp_dir": temp_dir, "ports": ports, "url": url, "env": env,
            "gcs": f"127.0.0.1:{ports['port']}"}
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError("ray start exited: " + (Path(temp_dir) / "ray-start.log").read_text()[-3000:])
            try:
                client = JobSubmissionClient(url)
                client.list_jobs()
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.time() > deadline:
                    raise
                time.sleep(1)
        info["client"] = client
        yield info
    finally:
        left = stop_head(proc, temp_dir)
        log.close()
        assert not left, f"processes of our head survived SIGKILL for 20 s: {left}"
        shutil.rmtree(temp_dir, ignore_errors=True)


# -- the tests --------------------------------------------------------------------------------
def _uploaded_package(temp_dir: str) -> Path:
    pkgs = [p for p in Path(temp_dir).glob("session_2*/runtime_resources/working_dir_files/*") if p.is_dir()]
    assert len(pkgs) == 1, pkgs
    return pkgs[0]


@pytest.mark.timeout(600)
def test_ray_job_submit_runs_the_pipeline_on_our_head_then_ray_address_attaches(head, tmp_path):
    from ray.job_submission import JobStatus

    root = tmp_path / "root"
    sid = f"persrep-test-{uuid.uuid4().hex[:8]}"
    # something the upload must leave out even though it sits in the working dir
    probe_dir = REPO / "runs"
    made_runs = not probe_dir.exists()
    probe = probe_dir / f".upload-probe-{sid}"
    probe_dir.mkdir(exist_ok=True)
    probe.write_text("must not be uploaded")
    t0 = time.perf_counter()
    try:
        sub = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", head["url"], "--submission-id", sid,
             "--working-dir", ".", "--runtime-env", "ray_jobs/runtime_env.yaml", "--",
             "python", "ray_jobs/run_all.py", "--config", "local", *TINY, "--storage", str(root),
             "--run-id", "submitted"],
            cwd=REPO, env=head["env"], capture_output=True, text=True, timeout=300, check=False)
    finally:
        probe.unlink(missing_ok=True)
        if made_runs:
            shutil.rmtree(probe_dir, ignore_errors=True)
    t_job = time.perf_counter() - t0
    client = head["client"]
    logs = client.get_job_logs(sid)
    assert sub.returncode == 0, sub.stdout[-3000:] + sub.stderr[-3000:] + logs[-5000:]
    assert client.get_job_status(sid) == JobStatus.SUCCEEDED
    job = client.get_job_info(sid)
    assert job.driver_exit_code == 0 and job.driver_node_id and job.driver_info.pid

    # the driver attached to OUR head (RAY_ADDRESS set by the job server), and printed the table
    gcs_port = head["ports"]["port"]
    attached = re.compile(rf"attached to the Ray cluster at [0-9.]+:{gcs_port} \(1 node\(s\), 2 CPUs, 0 GPUs\)")
    assert attached.search(logs), logs[-3000:]
    assert "started a local Ray cluster" not in logs
    for word in ("backbone", "data config", "pretrained", "classification", "retrieval", "cut_paste"):
        assert word in logs, word
    # `ray job submit` streams the driver's output (its stream may drop the very last lines,
    # ray-project/ray#48701: the final table is checked in the job's logs above)
    assert attached.search(sub.stdout), sub.stdout[-3000:]
    run_dir = root / "runs" / "submitted"
    doc = json.loads((run_dir / "summary.json").read_text())
    assert doc["failures"] == [] and doc["stages"]["personalization"]["done"] == 2, doc["stages"]
    frame = pd.read_parquet(run_dir / "results.parquet")
    assert set(frame["model"]) == {"pretrained", "personalised"} and frame["value"].notna().any()

    # what was uploaded: the code, without .venv, runs/ or .git (runtime_env.yaml's excludes)
    pkg = _uploaded_package(head["temp_dir"])
    assert (pkg / "ray_jobs" / "run_all.py").is_file() and (pkg / "persrep" / "pipeline" / "runner.py").is_file()
    for name in (".venv", "runs", ".git"):
        assert not (pkg / name).exists(), f"{name} was uploaded with the working dir"
    size = sum(f.stat().st_size for f in pkg.rglob("*") if f.is_file())
    assert size < 20 * 2**20, f"uploaded working dir is {size / 2**20:.1f} MiB"

    # plain `python ray_jobs/run_all.py` with RAY_ADDRESS attaches to the same head. The job starts
    # or attaches to a cluster only when a unit is left to compute, so one is left: an evaluation
    # whose manifest is removed (everything else is re-read, not recomputed)
    ev = sorted((root / "evaluations").glob("*/MANIFEST.json"))
    assert ev, "no published evaluation"
    ev[0].unlink()
    t1 = time.perf_counter()
    env = {**head["env"], "RAY_ADDRESS": head["gcs"]}
    plain = subprocess.run(
        [sys.executable, "ray_jobs/run_all.py", "--config", "local", *TINY, "--storage", str(root),
         "--run-id", "attached"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180, check=False)
    t_plain = time.perf_counter() - t1
    assert plain.returncode == 0, plain.stdout[-3000:] + plain.stderr[-3000:]
    assert attached.search(plain.stderr), plain.stderr[-3000:]
    assert "started a local Ray cluster" not in plain.stderr
    assert "classification" in plain.stdout
    again = json.loads((root / "runs" / "attached" / "summary.json").read_text())
    assert all(c["done"] == (name == "evaluation") and c["failed"] == 0
               for name, c in again["stages"].items()), again["stages"]
    pd.testing.assert_frame_equal(frame, pd.read_parquet(root / "runs" / "attached" / "results.parquet"))
    # ... and the head saw that driver as a job of its own
    drivers = [j for j in client.list_jobs() if str(j.type).endswith("DRIVER") and "run_all.py" in (j.entrypoint or "")]
    assert drivers, [(j.type, j.entrypoint) for j in client.list_jobs()]
    print(f"ray job submit: {t_job:.1f} s; RAY_ADDRESS re-run (one unit left): {t_plain:.1f} s")

    # the job CLI's RAY_ADDRESS (the dashboard URL) given to run_all: one line, exit 2, no compute
    wrong = subprocess.run([sys.executable, "ray_jobs/run_all.py", "--config", "local", *TINY, "--storage",
                            str(root)], cwd=REPO, env={**head["env"], "RAY_ADDRESS": head["url"]},
                           capture_output=True, text=True, timeout=120, check=False)
    assert wrong.returncode == 2, wrong.stderr[-2000:]
    [line] = [ln for ln in wrong.stderr.splitlines() if ln.startswith("run_all:")]
    assert f"RAY_ADDRESS={head['url']} is a dashboard (job submission) address" in line
    assert "Traceback" not in wrong.stderr
