#!/usr/bin/env python
"""Re-run of a finished job: wall and pipeline seconds of ``ray_jobs/run_all.py`` on a storage
root where every unit is already published (the demo: ``--config local``).

Run the job once to completion first (``python ray_jobs/run_all.py --config local --storage ROOT``,
~8 min on 2 idle cores), then:

    python bench/rerun.py --storage ROOT --label before --tree /path/to/main/checkout
    python bench/rerun.py --storage ROOT --label after            # this checkout

Labels pair by the words ``before`` / ``after`` (``before-no-ray`` / ``after-no-ray``,
``lazy-before`` / ``lazy-after``); each pair's ratio is recorded.

Each call runs the job ``--repeat`` times from ``--tree`` (its code, its ``ray_jobs/run_all.py``)
in a subprocess and records, per repeat: wall seconds of the whole command (Python start, imports,
Ray start, MLflow, report), the pipeline's own seconds (``summary.json`` ``timings.total``), the
per-stage seconds, and the units done / skipped (a re-run must do none). Results are merged into
``bench/rerun.json`` under the label, so "before" and "after" sit side by side with their ratio.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--storage", required=True, help="storage root of a finished --config local run")
    ap.add_argument("--label", required=True, help="before | after (any name)")
    ap.add_argument("--tree", default=str(REPO), help="source tree whose code runs (default: this one)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "bench" / "rerun.json"))
    ap.add_argument("--extra", nargs="*", default=[], help="more run_all.py arguments, e.g. --no-ray")
    args = ap.parse_args(argv)
    tree, storage = Path(args.tree).resolve(), Path(args.storage).resolve()
    runs = []
    for i in range(args.repeat):
        run_id = f"rerun-{args.label}-{int(time.time())}-{i}"
        env = {**os.environ, "PYTHONPATH": str(tree), "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
        for attempt in range(1, 4):  # Ray's fixed 30 s raylet start wait fails on an overloaded box
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "ray_jobs/run_all.py", "--config", "local", "--storage",
                                   str(storage), "--run-id", run_id, *args.extra], cwd=tree, env=env,
                                  capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if "timed out during startup" not in proc.stdout + proc.stderr:
                break
            print(f"{args.label} #{i + 1}: Ray did not start (machine overloaded), attempt {attempt}", flush=True)
            time.sleep(20)
        if proc.returncode != 0:
            sys.exit(f"run_all.py exited {proc.returncode}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        doc = json.loads((storage / "runs" / run_id / "summary.json").read_text())
        done = sum(c.get("done", 0) for c in doc["stages"].values())
        runs.append({"wall_s": round(wall, 2), "pipeline_s": doc["timings"]["total"],
                     "stage_s": {k: v for k, v in doc["timings"].items() if k != "total"},
                     "units_done": done,
                     "units_skipped": sum(c.get("skipped", 0) for c in doc["stages"].values())})
        print(f"{args.label} #{i + 1}: wall {wall:.1f} s, pipeline {doc['timings']['total']} s, "
              f"{done} units done", flush=True)
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() else {"benchmark": "rerun", "results": {}}
    result["results"][args.label] = {
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "tree": str(tree), "extra_args": args.extra, "loadavg": os.getloadavg(), "runs": runs,
        "wall_s_min": min(r["wall_s"] for r in runs), "pipeline_s_min": min(r["pipeline_s"] for r in runs)}
    res = result["results"]
    for before in [k for k in res if "before" in k]:  # before / after, before-no-ray / after-no-ray, lazy-before / ...
        after = before.replace("before", "after")
        if after in res:
            result.setdefault("ratio_before_over_after", {})[before.replace("before", "").strip("-") or "ray"] = {
                "wall": round(res[before]["wall_s_min"] / res[after]["wall_s_min"], 2),
                "pipeline": round(res[before]["pipeline_s_min"] / res[after]["pipeline_s_min"], 2)}
    tmp = out.with_suffix(".json.partial")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out)
    print(json.dumps({k: v for k, v in result.items() if k != "results"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
