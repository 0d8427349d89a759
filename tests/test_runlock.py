"""One job per storage root (issue #20): a lock naming host + PID; stale locks taken over; two
``run_all`` started at once on the same root: one runs, the other is refused in one line."""

from __future__ import annotations

import json
import multiprocessing as mp
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from persrep.runlock import LOCK, RunLock, RunLockError
from persrep.storage import Storage

sys.path.insert(0, str(Path(__file__).parent))
from helpers import error_lines, finish, job_env, run_all_argv, spawn  # noqa: E402
from worlds import FAST  # noqa: E402


def _root(backend: str, tmp_path: Path, request) -> str:
    return str(tmp_path / "root") if backend == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/p"


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_second_job_refused_naming_the_owner_then_free_after_release(backend, tmp_path, request):
    st = Storage(_root(backend, tmp_path, request))
    first = RunLock(st, "run-a")
    first.acquire()
    rec = json.loads(st.read_bytes(LOCK))
    assert (rec["host"], rec["pid"], rec["run_id"]) == (socket.gethostname(), __import__("os").getpid(), "run-a")
    with pytest.raises(RunLockError) as exc:
        RunLock(st, "run-b").acquire()
    msg = str(exc.value)
    assert "\n" not in msg and "in use by run_all (run run-a)" in msg and socket.gethostname() in msg
    assert f"pid {rec['pid']}" in msg and st.uri(LOCK) in msg
    first.release()
    assert not st.exists(LOCK)
    with RunLock(st, "run-b"):
        assert json.loads(st.read_bytes(LOCK))["run_id"] == "run-b"
    assert not st.exists(LOCK)


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_stale_locks_are_taken_over_with_a_message(backend, tmp_path, request):
    st = Storage(_root(backend, tmp_path, request))
    host = socket.gethostname()
    me = RunLock(st, "x")._record()
    cases = {  # lock record -> why it is stale
        "dead pid": {**me, "pid": _dead_pid(), "pid_start": None},
        "pid reused": {**me, "pid_start": "1"},  # our pid, but another process's start time
        "silent other host": {**me, "host": host + "-elsewhere", "heartbeat": time.time() - 3600},
        # an earlier job of this very process that could not delete it (S3 down at its end)
        "left by this process": {**me},
    }
    for case, rec in cases.items():
        st.write_bytes(LOCK, json.dumps(rec).encode())
        said = []
        with RunLock(st, "new", said.append):
            assert json.loads(st.read_bytes(LOCK))["run_id"] == "new", case
        assert len(said) == 1 and said[0].startswith("lock: took over a stale lock"), (case, said)
    # another host with a fresh heartbeat may be running: refused
    st.write_bytes(LOCK, json.dumps({**me, "host": host + "-elsewhere", "heartbeat": time.time()}).encode())
    with pytest.raises(RunLockError, match="-elsewhere"):
        RunLock(st, "new").acquire()


def _race(root: str, barrier, done, results, i: int) -> None:
    lock = RunLock(Storage(root), f"r{i}")
    barrier.wait()
    try:
        lock.acquire()
    except RunLockError:
        results.put(-1)
        done.wait(120)
        return
    results.put(i)
    done.wait(120)  # the winner holds the lock until every racer has had its answer, however slow
    lock.release()


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_jobs_starting_at_the_same_moment_exactly_one_wins(backend, tmp_path, request):
    root = _root(backend, tmp_path, request)
    ctx = mp.get_context("fork")
    for _ in range(3):
        barrier, done, results = ctx.Barrier(4), ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_race, args=(root, barrier, done, results, i)) for i in range(4)]
        for p in procs:
            p.start()
        got = sorted(results.get(timeout=120) for _ in procs)
        for p in procs:
            p.join(120)
        assert got.count(-1) == 3 and got[-1] >= 0, got
    assert not Storage(root).exists(LOCK)


@pytest.mark.slow
def test_two_run_all_on_one_root_one_runs_the_other_is_refused(tmp_path):
    """Two real run_all processes started together on one storage root."""
    root = tmp_path / "root"
    env = job_env()
    procs = [spawn(run_all_argv(root, f"r{i}", *FAST), tmp_path / "logs", f"r{i}", env) for i in range(2)]
    rcs = [finish(p, timeout=400) for p in procs]
    errs = [(tmp_path / "logs" / f"r{i}.err").read_text() for i in range(2)]
    assert sorted(rcs) == [0, 2], (rcs, [e[-2000:] for e in errs])
    loser = rcs.index(2)
    lines = error_lines(errs[loser])
    assert len(lines) == 1 and "is in use by run_all (run r" in lines[0] and "pid" in lines[0], errs[loser]
    assert f"pid {procs[1 - loser].pid}" in lines[0]
    # the refused one computed nothing and wrote no run folder; the lock is gone after the winner
    assert not (root / "runs" / f"r{loser}").exists()
    assert (root / "runs" / f"r{1 - loser}" / "summary.json").exists()
    assert not (root / LOCK).exists()
