"""The chaos soak (tests/chaos/soak.py) for N seeds -> bench/chaos.json.

    python bench/chaos.py --seeds 1 2 3          # one soak per seed, each a fresh cluster
    python bench/chaos.py --seeds 1 2 --faults 7 # more faults per soak (kinds cycle)
    python bench/chaos.py --sweep-faults 3       # faults reserved for the sweep phase (default 2)

First one soak **without faults** (the baseline: the same job and sweep on the same kind of
cluster, uninterrupted), then one per seed. Per seed: the faults injected by kind, whether the job
and the sweep finished with the reference's units and results (survived), units lost (must be
0), and the extra seconds the faults cost: the seed's job + sweep wall time (every attempt,
restarts included) minus the baseline's. Each soak is a subprocess in its own session; the
in-process reference runs are computed once and shared (``--reference`` of soak.py). The machine
is shared and loaded: seconds are wall-clock on 2 cores, compare them only within one file.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SOAK = REPO / "tests" / "chaos" / "soak.py"


def run_soak(seed: int, faults: int, work: Path, ref: Path, sweep_faults: int = 0) -> dict:
    out = work / f"soak-{seed}-{faults}.json"
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, str(SOAK), "--seed", str(seed), "--faults", str(faults),
                        "--sweep-faults", str(sweep_faults),
                        "--workdir", str(work / f"w{seed}-{faults}"), "--reference", str(ref), "--out", str(out)],
                       env={**__import__("os").environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                       text=True, timeout=3600, start_new_session=True)
    if p.returncode != 0 or not out.exists():
        return {"seed": seed, "error": (p.stdout + p.stderr)[-3000:], "seconds_total": round(time.monotonic() - t0, 1)}
    res = json.loads(out.read_text())
    res["seconds_total"] = round(time.monotonic() - t0, 1)
    return res


def survived(res: dict) -> bool:
    """The soak's promises (tests/chaos/test_chaos.py asserts the same)."""
    if "error" in res:
        return False
    ok = res["phases_finished"] == ["run_all", "sweep"] and res["units_lost"] == 0
    ok &= all(not c["lost"] and not c["extra"] for c in res["stages"].values())
    ok &= not res["bad_checksums"] and not res["partial_units"] and not res["rows_not_once"]
    for part in ("job_results", "sweep_results"):
        r = res[part]
        ok &= r["rows"] > 0 and not r["missing"] and not r["extra"] and r["duplicated"] == 0
        ok &= r["max_abs_diff"] is not None and r["max_abs_diff"] <= res["atol"]
    ok &= not res["orphans"] and not res["drivers_left"]
    return bool(ok)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--faults", type=int, default=5, help="faults during the job")
    p.add_argument("--sweep-faults", type=int, default=2, help="faults during the sweep")
    p.add_argument("--out", default=str(HERE / "chaos.json"))
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-chaos-"))
    ref = work / "reference"
    base = run_soak(0, 0, work, ref)
    if "error" in base:
        print(base["error"], file=sys.stderr)
        return 1
    base_s = base["seconds"]["attempts"]
    seeds, by_kind, survived_kind = [], {}, {}
    for seed in args.seeds:
        res = run_soak(seed, args.faults, work, ref, args.sweep_faults)
        ok = survived(res)
        row = {"seed": seed, "survived": ok, "error": res.get("error")}
        if "error" not in res:
            row.update(injected=res["injected"], injected_by_phase=res["injected_by_phase"],
                       not_injected=res["faults_not_injected"],
                       units_lost=res["units_lost"], attempts=[(a["phase"], a["rc"], a["seconds"]) for a in res["attempts"]],
                       retried=res["job_summary"]["retries"], seconds=res["seconds"]["attempts"],
                       extra_seconds=round(res["seconds"]["attempts"] - base_s, 1),
                       max_abs_diff={k: res[k]["max_abs_diff"] for k in ("job_results", "sweep_results")},
                       kills=res["kills"])
            for kind, n in res["injected"].items():
                by_kind[kind] = by_kind.get(kind, 0) + n
                survived_kind[kind] = survived_kind.get(kind, 0) + (n if ok else 0)
        seeds.append(row)
        print(json.dumps({k: row.get(k) for k in ("seed", "survived", "injected", "units_lost", "extra_seconds")}), flush=True)
    done = [s for s in seeds if s.get("error") is None]
    doc = {
        "what": "tests/chaos/soak.py per seed: the tiny job (all stages) + a 2-configuration sweep on a "
                "2-node ray.cluster_utils.Cluster, storage on a moto S3 server, under a seeded killer",
        "machine": "shared 2-core box, other engineers' tests running (wall-clock seconds are noisy)",
        "faults_per_soak": args.faults,
        "sweep_faults_per_soak": args.sweep_faults,
        "baseline": {"seconds": base_s, "attempts": [(a["phase"], a["rc"], a["seconds"]) for a in base["attempts"]],
                     "survived": survived(base)},
        "figures": {"seeds": len(seeds), "soaks_survived": sum(s["survived"] for s in seeds),
                    "faults_injected_by_kind": by_kind, "faults_survived_by_kind": survived_kind,
                    "faults_injected": sum(by_kind.values()), "faults_survived": sum(survived_kind.values()),
                    "faults_injected_during_sweep": sum(s.get("injected_by_phase", {}).get("sweep", 0) for s in done),
                    "units_lost": sum(s.get("units_lost", 0) for s in done),
                    "extra_seconds_mean": round(sum(s["extra_seconds"] for s in done) / len(done), 1) if done else None,
                    "extra_seconds_max": max((s["extra_seconds"] for s in done), default=None)},
        "seeds": seeds,
        "reference_seconds_in_process": base["seconds"]["reference_in_process"],
    }
    Path(args.out).write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print(json.dumps(doc["figures"], indent=1))
    return 0 if all(s["survived"] for s in seeds) else 1


if __name__ == "__main__":
    sys.exit(main())
