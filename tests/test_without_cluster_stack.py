"""The library without the cluster stack: ``import persrep``, the command line and the in-process
pipeline work when ray and mlflow cannot be imported (the ground for optional extras
``persrep[ray]`` / ``[mlflow]``; the default install still has both).

A fresh interpreter blocks them before anything is imported: ``sys.modules[name] = None`` is
Python's own "not installed" (``import`` raises ModuleNotFoundError and
``importlib.util.find_spec`` returns None, which is what diffusers' and accelerate's availability
probes ask; a meta-path finder that raises breaks those probes instead of answering them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from worlds import FAST

REPO = Path(__file__).resolve().parents[1]
BLOCKED = ("ray", "mlflow")

PROBE = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None
import persrep
from persrep.cli import main
assert main(["config", "show", "--config", "local"]) == 0
from persrep.config import load_settings
from persrep.pipeline import run_pipeline
from persrep.pipeline.executor import LocalExecutor

settings = load_settings("local", {overrides!r})
summary = run_pipeline(settings, print, LocalExecutor(), run_id="nocluster")
loaded = sorted(m for m, v in sys.modules.items() if m.split(".")[0] in {blocked!r} and v is not None)
print("RESULT", summary.exit_code, loaded)
"""


@pytest.mark.slow
def test_import_cli_and_in_process_pipeline_without_ray_and_mlflow(tmp_path):
    overrides = [*FAST, f"storage.root={tmp_path / 'root'}", "data.max_instances=1",
                 "generator.types=[real_only]", "evaluation.tasks=[classification]",
                 "personalization.max_steps=1", "tracking.enabled=true"]  # tracking on: it must degrade
    code = PROBE.format(blocked=BLOCKED, overrides=overrides)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "RESULT 0 []", out.stdout[-2000:]
    assert "tracking unavailable" in out.stdout and "degraded" in out.stdout
    run = tmp_path / "root" / "runs" / "nocluster"
    results = pd.read_parquet(run / "results.parquet")
    assert {"pretrained", "personalised"} <= set(results["model"]) and results["value"].notna().any()
    assert json.loads((run / "summary.json").read_text())["failures"] == []
