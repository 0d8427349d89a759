"""The quiet terminal: the job prints its own progress, tables, failures and summary; Ray's,
Tune's and MLflow's output goes to job.log; a failed unit's traceback to failures/<unit>.txt."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from worlds import ONE_INSTANCE

from persrep.console import Console, failure_file, status_table
from persrep.pipeline.executor import Outcome

REPO = Path(__file__).resolve().parents[1]
# the job plumbing on one instance (tests/test_job_submit.py's world): no DreamBooth, no dense tasks
TINY = [*ONE_INSTANCE, "resources.max_retries=1"]
STAMP = re.compile(r"^\[\d\d:\d\d:\d\d\] ")


def _lines(console_out: io.StringIO) -> list[str]:
    return [ln for ln in console_out.getvalue().splitlines() if ln.strip()]


def test_plain_progress_is_throttled_and_tables_name_every_unit(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    con = Console(interactive=False, plain_every_s=3600)
    con("data: somewhere (20 instances)")
    con("stage personalization: 40 units (Ray Tune)")
    outs = []
    for i in range(40):
        label = f"{'cut_paste' if i % 2 else 'real_only'}:tf_efficientnet_lite0:inst_{i // 2:02d}"
        status = "failed" if i == 7 else "done"
        if i == 7:
            con(f"personalization: retrying {label} (attempt 2): ValueError: bad pixels")
        con(f"personalization: {i + 1}/40 {label} -> {status}")
        con(f"personalization trial detail {i}")  # a detail line inside a stage: log only
        outs.append(Outcome(label, status, attempts=2 if i == 7 else 1))
    con("stage personalization: 39 done, 0 skipped (finished earlier), 1 failed in 12.0 s")
    con.stage_outcomes("personalization", outs)
    lines = _lines(err)
    text = "\n".join(lines)
    # one line per quarter (3: 25 %, 50 %, 75 %), not one per unit; details stay out
    progress = [ln for ln in lines if "personalization 1" in ln or re.search(r"personalization \d+/40", ln)]
    assert len(progress) == 3, progress
    assert "1 failed" in progress[-1] and "ETA" in progress[-1]
    assert "trial detail" not in text
    assert "RETRIED personalization cut_paste:tf_efficientnet_lite0:inst_03 (attempt 2): ValueError: bad pixels" in text
    # the table: 20 instance rows, columns real_only / cut_paste (the shared backbone dropped)
    header = next(ln for ln in lines if ln.startswith("instance"))
    assert header.split() == ["instance", "real_only", "cut_paste"]
    assert re.search(r"inst_03\s+done\s+FAILED \(2 tries\)", text), text
    assert sum(ln.startswith("inst_") for ln in lines) == 20
    assert len(lines) <= 3 + 3 + 1 + 2 + 20 + 2  # start, quarters, retry, end, header+rule, rows


def test_status_table_and_failure_file_names():
    rows, cols = status_table([Outcome("pos:abc:mug_0", "done"), Outcome("neg:base:mug", "skipped"),
                               Outcome("pretrained:lite0:all", "done")])
    assert cols == ["pos:abc", "neg:base", "pretrained:lite0"]
    assert rows["mug"] == {"neg:base": "skipped"}
    assert failure_file("cut_paste:tf/b:mug 0") == "failures/cut_paste_tf_b_mug_0.txt"
    rows, cols = status_table([Outcome("pos:k1:mug_0", "done"), Outcome("pos:k2:mug_0", "failed", attempts=3)],
                              {"k1": "cut_paste", "k2": "dreambooth/cfg5/template"})
    assert cols == ["cut_paste", "dreambooth/cfg5/template"]
    assert rows["mug_0"]["dreambooth/cfg5/template"] == "FAILED (3 tries)"


def test_terminal_bar_on_a_tty_is_rich(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    err = Tty()
    monkeypatch.setattr(sys, "stderr", err)
    con = Console()
    assert con.interactive
    con("stage evaluation: 3 units")
    assert con._progress is not None  # a live rich bar while the stage runs
    for i in range(3):
        con(f"evaluation: {i + 1}/3 adapter:b:x{i} -> done")
    con("stage evaluation: 3 done, 0 skipped (finished earlier), 0 failed in 1.0 s")
    assert con._progress is None
    assert "stage evaluation: 3 done" in err.getvalue()


@pytest.mark.ray
@pytest.mark.slow
def test_job_terminal_is_short_and_complete(tmp_path):
    """The real job (local Ray cluster, Tune, MLflow) in a subprocess whose output is not a TTY.

    Negatives that cannot be decoded make both personalisation units fail after one retry, so
    the output must carry RETRIED and FAILED lines (one line each, naming the traceback file).
    Bound: the terminal shows O(stages + instances + units) lines - here 4 stages, 1 instance,
    4 units - so 60 lines leaves room for the data / cluster / log lines and the 10-line summary,
    while a single unfiltered Tune trial or a traceback alone is longer than that (today's demo
    printed ~500 lines, most of them Ray's)."""
    bad = tmp_path / "bad_negatives"
    bad.mkdir()
    for i in range(3):
        (bad / f"junk_{i}.png").write_bytes(b"not a png at all " * 20)
    root = tmp_path / "root"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO),
                "OMP_NUM_THREADS": "1"})
    proc = subprocess.run([sys.executable, str(REPO / "ray_jobs" / "run_all.py"), "--storage", str(root),
                           "--run-id", "quiet", *TINY, "personalization.negatives=external",
                           f"personalization.external_negatives={bad}"],
                          env=env, capture_output=True, text=True, timeout=420, cwd=tmp_path, check=False)
    out, err = proc.stdout, proc.stderr
    both = out + err
    run_dir = root / "runs" / "quiet"
    log = run_dir / "job.log"
    assert proc.returncode == 1, both[-4000:]
    lines = [ln for ln in both.splitlines() if ln.strip()]
    assert len(lines) <= 60, f"{len(lines)} lines:\n{both}"
    # every stage, opened and closed
    for stage in ("generator_prep", "synthesis", "personalization", "evaluation"):
        assert re.search(rf"stage {stage}: \d+ units", err), stage
        assert re.search(rf"stage {stage}: \d+ done, \d+ skipped .* failed in", err), stage
    # every unit outcome: the per-instance tables
    inst = re.search(r"data: .*\((\d+) instances", err)
    assert inst
    assert re.search(r"^\S+_\d\s+done\s*$", err, re.M), err  # synthesis: the instance's positives
    assert re.search(r"^\S+_\d\s+FAILED \(2 tries\)\s+FAILED \(2 tries\)\s*$", err, re.M), err
    assert re.search(r"^all\s+done\s*$", err, re.M), err  # evaluation of the pretrained backbone
    # retries and failures: one line each with the reason; tracebacks only in the run directory
    assert re.search(r"RETRIED personalization \S+ \(attempt 2\): \w+", err), err
    failed = [ln for ln in out.splitlines() if ln.startswith("FAILED personalization ")]
    assert len(failed) == 2, out
    for ln in failed:
        path = re.search(r"\(traceback: (\S+)\)$", ln)
        assert path, ln
        trace = Path(path[1]).read_text()  # Tune's error file: every attempt's traceback
        assert 'File "' in trace and "UnidentifiedImageError" in trace and "\x1b[" not in trace, trace
    assert "Traceback" not in both and 'File "' not in both
    print(both)  # what a user sees (pytest -s)
    # the summary table and the log's location
    # no adapter was evaluated: no nan rows, one line naming the backbone and why (issue #29)
    assert "nan" not in out and f"results: {run_dir}" in out
    assert re.search(r"^no adapter results for backbone\(s\) tf_efficientnet_lite0 \(2 personalisation unit\(s\) "
                     r"failed, first: UnidentifiedImageError", out, re.M), out
    assert f"log: {log}" in err
    # nobody else's output on the terminal; it is in the log
    for noise in ("INFO worker.py", "Started a local Ray instance", "mlflow.store", "Trial status",
                  "Checkpoint successfully created", "(personalize_trial pid=", "logging_progress"):
        assert noise not in both, noise
    text = log.read_text()
    assert "Started a local Ray instance" in text and "stage personalization" in text


def test_progress_events_are_the_line_protocol_the_console_reads():
    """persrep.pipeline.progress: typed events; SayProgress writes them as the lines Console parses."""
    from persrep.console import STAGE_END, STAGE_START, UNIT_DONE, UNIT_RETRY
    from persrep.pipeline.executor import Executor, LocalExecutor
    from persrep.pipeline.progress import SayProgress, as_progress

    lines: list[str] = []
    p = as_progress(lines.append)
    assert isinstance(p, SayProgress) and as_progress(p) is p
    p.on_stage_start("synthesis", 3, "Ray Data")
    p.on_unit("synthesis", 1, 3, "pos:cfg:mug_0", "done")
    p.on_unit("synthesis", 2, 3, "pos:cfg:mug_1", "failed", attempts=2)
    p.on_retry("synthesis", "pos:cfg:mug_1", 2, "RuntimeError: lost")
    p.on_stage_end("synthesis", {"done": 1, "skipped": 1, "failed": 1}, 1.25, [])
    p("data: toy")
    assert lines == ["stage synthesis: 3 units (Ray Data)", "synthesis: 1/3 pos:cfg:mug_0 -> done",
                     "synthesis: 2/3 pos:cfg:mug_1 -> failed after 2 attempts",
                     "synthesis: retrying pos:cfg:mug_1 (attempt 2): RuntimeError: lost",
                     "stage synthesis: 1 done, 1 skipped (finished earlier), 1 failed in 1.2 s", "data: toy"]
    assert STAGE_START.match(lines[0]) and UNIT_DONE.match(lines[1]) and UNIT_DONE.match(lines[2])
    assert UNIT_RETRY.match(lines[3]) and STAGE_END.match(lines[4])
    ex = LocalExecutor()  # the declared contract: nothing probed
    assert isinstance(ex, Executor) and ex.started and ex.sequential and ex.stage_runner("synthesis") is None
