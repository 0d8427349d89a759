"""Entry points a newcomer types: ``persrep sweep`` (= ray_jobs/sweep.py), ``bench/run_all.py``
(= ``make bench``), and the run job's --verbose flag."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from persrep.cli import main as cli_main
from persrep.distributed.job import parse_args

REPO = Path(__file__).resolve().parents[1]


def _bench_runner():
    spec = importlib.util.spec_from_file_location("persrep_bench_run_all", REPO / "bench" / "run_all.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_persrep_sweep_is_the_sweep_job(capsys, tmp_path):
    assert cli_main(["sweep", "--space", str(REPO / "tune_spaces" / "toy.yaml"), "--check"]) == 0
    out = capsys.readouterr().out
    assert "sweep space" in out and ": ok (" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: local\nmetric: retrieval.ndcg\nsearch: grid\nparams: {nonsense.key: {grid: [1, 2]}}\n")
    assert cli_main(["sweep", "--space", str(bad), "--check"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip()


def test_verbose_flag_parses():
    assert parse_args(["--verbose", "a.b=1"]).verbose is True
    assert parse_args([]).verbose is False


def test_bench_run_all_runs_chosen_benchmarks_and_prints_one_table(tmp_path, capsys):
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "fast.py").write_text(
        "import json, pathlib\n"
        "pathlib.Path(__file__).with_suffix('.json').write_text(json.dumps({'timestamp': 'now', 'x': 1}))\n")
    (bench / "broken.py").write_text("raise SystemExit(3)\n")
    mod = _bench_runner()
    assert mod.benchmarks(bench) == ["broken", "fast"]
    assert mod.main(["fast"], bench_dir=bench) == 0
    out = capsys.readouterr().out
    row = next(ln for ln in out.splitlines() if ln.startswith("fast"))
    assert "fast.json (now)" in row and row.split()[1] == "0"
    assert json.loads((bench / "fast.json").read_text())["x"] == 1
    assert mod.main([], bench_dir=bench) == 1  # broken exits 3: the table says so, the exit code too
    out = capsys.readouterr().out
    assert next(ln for ln in out.splitlines() if ln.startswith("broken")).split()[1] == "3"
    assert mod.main(["nope"], bench_dir=bench) == 2


def test_bench_table_of_committed_results(capsys):
    mod = _bench_runner()
    assert mod.main(["--table"]) == 0
    out = capsys.readouterr().out
    for name in ("generation", "synthesis", "personalize", "evaluate", "quality"):
        line = next(ln for ln in out.splitlines() if ln.startswith(name))
        assert "missing" not in line and " -," not in line and not line.rstrip().endswith(" -"), line
    assert sys.executable  # the runner uses this interpreter for the scripts
