"""Run every benchmark (or the chosen ones) and print one table of their headline figures.

    python bench/run_all.py                      # every benchmark, one after another (long: quality ~25 min)
    python bench/run_all.py evaluate personalize # only these
    python bench/run_all.py --table              # no runs: the table of the committed JSON files
    python bench/run_all.py --list               # the benchmarks and what each measures

Each benchmark is its own script (``bench/<name>.py``) run in a fresh process, so one's memory
and threads never affect the next; it writes ``bench/<name>.json`` itself. This script adds
nothing to their measurements: it reads each JSON back and prints the figures that matter, plus
the exit code and wall time of the runs it made. ``make bench`` calls it.
Exit code: 0 when every benchmark it ran exited 0, else 1.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _get(doc: dict[str, Any], path: str) -> Any:
    cur: Any = doc
    for part in path.split("/"):
        if isinstance(cur, list) and part.isdigit() and int(part) < len(cur):  # runs/0/...
            cur = cur[int(part)]
            continue
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return "-" if v is None else str(v)


# name -> (what it measures, [(label, JSON path)])
HEADLINES: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "generation": ("tiny-model synthesis through our path vs plain diffusers; DreamBooth s/step",
                   [("ours/plain images/s", "synthesis/ratio_ours_over_plain"),
                    ("DreamBooth LoRA s/step", "dreambooth/lora/seconds_per_step")]),
    "synthesis": ("Ray Data synthesis stage vs a single-process loop",
                  [("ray/best single rows/s", "figures/throughput_ratio_ray_over_best_single"),
                   ("rows", "figures/rows")]),
    "scale": ("scale simulation: real stages, trivial work, s3 (moto): 1,000+ units",
              [("synthesis driver ms/unit", "runs/0/first/synthesis/driver_cpu_ms_per_unit"),
               ("re-run S3 req/unit", "runs/0/rerun/synthesis/s3_requests_per_unit")]),
    "personalize": ("training steps/s through the Tune stage vs a plain loop",
                    [("tune/plain steps/s", "figures/ratio_tune_over_plain"),
                     ("K=2/K=1 throughput", "figures/k2_over_k1_end_to_end_throughput")]),
    "evaluate": ("four-task evaluation of one instance vs a ~1,000-image pool, cold vs cached",
                 [("images/s", "embed_images_per_s"), ("cold/cached", "cold_over_cached")]),
    "dense": ("demo toy world: dense scenes (toy-1 vs toy-2) x CNN dense features (last vs hypercolumn)",
              [("toy-2 det mAP hyper/last", "hypercolumn_over_last/toy-2/detection.map"),
               ("toy-2 seg mAP hyper", "results/toy-2/hypercolumn/segmentation.map")]),
    "chaos": ("seeded chaos soaks (tests/chaos/soak.py): job + sweep on a 2-node cluster under random kills",
              [("faults injected", "figures/faults_injected"), ("survived", "figures/faults_survived"),
               ("units lost", "figures/units_lost"), ("extra s (mean)", "figures/extra_seconds_mean")]),
    "quality": ("real photos: pretrained vs real-only vs cut-and-paste (COIL composites, DreamBooth)",
                [("COIL AP cut_paste", "summary/coil/variants/cut_paste/tasks/classification.ap/mean"),
                 ("COIL AP pretrained", "summary/coil/variants/pretrained/tasks/classification.ap/mean")]),
}


def benchmarks(bench_dir: Path = HERE) -> list[str]:
    """Every ``bench/<name>.py`` but this one, in a stable order (known ones first)."""
    found = sorted(p.stem for p in bench_dir.glob("*.py") if p.stem != "run_all" and not p.stem.startswith("_"))
    return [n for n in HEADLINES if n in found] + [n for n in found if n not in HEADLINES]


def headline(name: str, doc: dict[str, Any] | None) -> str:
    if doc is None:
        return "no JSON"
    fields = HEADLINES.get(name, ("", []))[1]
    if not fields:
        return f"{len(doc)} top-level keys"
    return ", ".join(f"{label} {_fmt(_get(doc, path))}" for label, path in fields)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_one(name: str, bench_dir: Path, python: str = sys.executable,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    script = bench_dir / f"{name}.py"
    log(f"[{time.strftime('%H:%M:%S')}] {name}: {script}")
    t0 = time.perf_counter()
    proc = subprocess.run([python, str(script)], cwd=bench_dir.parent, check=False)
    return {"name": name, "rc": proc.returncode, "seconds": round(time.perf_counter() - t0, 1)}


def table(rows: list[dict[str, Any]], bench_dir: Path) -> str:
    head = ["benchmark", "exit", "wall s", "JSON", "headline"]
    body = []
    for r in rows:
        path = bench_dir / f"{r['name']}.json"
        doc = _read(path)
        stamp = (doc or {}).get("timestamp", "")
        body.append([r["name"], _fmt(r.get("rc")), _fmt(r.get("seconds")),
                     f"{path.name}{f' ({stamp})' if stamp else ''}" if doc is not None else "missing",
                     headline(r["name"], doc)])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in body]
    return "\n".join(lines)


def main(argv: list[str] | None = None, bench_dir: Path = HERE) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    ap.add_argument("--table", action="store_true", help="print the committed results; run nothing")
    ap.add_argument("--list", action="store_true", help="list the benchmarks")
    ap.add_argument("--dir", default=str(bench_dir), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    bench_dir = Path(args.dir)
    known = benchmarks(bench_dir)
    unknown = [n for n in args.names if n not in known]
    if unknown:
        print(f"run_all: unknown benchmark(s) {unknown}; choose from {known}", file=sys.stderr)
        return 2
    names = args.names or known
    if args.list:
        for n in known:
            print(f"{n:12s} {HEADLINES.get(n, ('(no headline registered)',))[0]}")
        return 0
    if args.table:
        print(table([{"name": n} for n in names], bench_dir))
        return 0
    rows = [run_one(n, bench_dir) for n in names]
    print(table(rows, bench_dir))
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
