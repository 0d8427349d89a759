"""CI's seeded chaos soak (issue #20): the tiny job and a two-configuration sweep on a
``ray.cluster_utils.Cluster`` under a killer (a synthesis actor, a trial's worker, a worker node,
the driver, the S3 server for 3 s): same units and results as uninterrupted runs, nothing lost,
doubled or half-published, no process left. The soak itself is tests/chaos/soak.py (also run for
many seeds by bench/chaos.py -> bench/chaos.json); this test runs one seed and asserts. The
sweep has faults of its own (``--sweep-faults``, default 2): at least one must land in it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))
from helpers import kill_job, session_pids  # noqa: E402

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.ray]
SEED = 20261205
MIN_KINDS = 3  # of the 5 planned, at least this many must find their target and be injected


def check_soak(res: dict) -> None:
    """Everything the soak promises (shared with bench/chaos.py)."""
    assert res["phases_finished"] == ["run_all", "sweep"], res["attempts"]
    for stage, c in res["stages"].items():
        assert c["lost"] == [] and c["extra"] == [], (stage, c)
        assert c["units"] == c["reference"], (stage, c)
    assert res["units_lost"] == 0
    assert res["bad_checksums"] == [] and res["partial_units"] == [] and res["rows_not_once"] == []
    for part in ("job_results", "sweep_results"):
        r = res[part]
        assert r["rows"] > 0 and r["missing"] == [] and r["extra"] == [], (part, r)
        assert r["duplicated"] == 0 and r["nan_mismatch"] == 0, (part, r)
        assert r["max_abs_diff"] <= res["atol"], (part, r)
    assert res["sweep_trials_n"] == 2
    assert res["orphans"] == [] and res["drivers_left"] == [], (res["orphans"], res["drivers_left"])
    # the summary names what was retried: the final job's summary.json retries, and a RETRIED /
    # retrying line in the job's output for each unit retried
    assert res["job_summary"]["failures"] == []


@pytest.mark.timeout(1500)
def test_seeded_chaos_soak_loses_nothing(tmp_path):
    out = tmp_path / "soak.json"
    env = {**os.environ, "PYTHONPATH": str(HERE.parents[1])}
    env.pop("RAY_ADDRESS", None)
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(HERE / "soak.py"), "--seed", str(SEED), "--workdir",
                             str(tmp_path / "work"), "--out", str(out)], env=env,
                            stdout=open(tmp_path / "soak.log", "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        rc = proc.wait(timeout=1400)
        # nothing of the soak's session (its cluster's raylets, GCS, workers) outlives it
        deadline = time.monotonic() + 30
        left = session_pids(proc.pid)
        while left and time.monotonic() < deadline:
            time.sleep(0.5)
            left = session_pids(proc.pid)
    finally:  # a soak that overran is stopped with its whole session, not left to load later tests
        kill_job(proc, grace_s=10)
    assert rc == 0 and out.exists(), (tmp_path / "soak.log").read_text(errors="replace")[-4000:]
    assert left == [], f"processes of the soak's cluster outlived it: {left}"
    res = json.loads(out.read_text())
    print(f"chaos soak seed {SEED}: injected {res['injected']}, not injected {res['faults_not_injected']}, "
          f"attempts {[(a['phase'], a['rc']) for a in res['attempts']]}, {time.monotonic() - t0:.0f} s")
    check_soak(res)
    assert sum(res["injected"].values()) >= MIN_KINDS, res["kills"]
    assert res["injected_by_phase"]["sweep"] >= 1, res["kills"]  # the sweep ran under faults too
