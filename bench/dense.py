"""Dense tasks on the demo's toy world: scene design x CNN dense features (pretrained backbone).

    python bench/dense.py [--out bench/dense.json]

Writes the demo's toy world twice into a temp dir: as ``toy-1`` (target 0.3-0.5 of the frame among
3-5 distractors, the scenes before this benchmark) and as the current version (``toy-2``: target
0.5-0.7, 1-2 distractors), then evaluates detection and segmentation of the real offline
EfficientNet-Lite0 (the demo's settings: 8 instances, 256 px dense input) with
``evaluation.dense_features`` = ``last`` (the stride-32 map) and ``hypercolumn`` (stride-16 stage
+ upsampled last map), through the pipeline's own ``Evaluator``. Figures x100, mean over instances.
It measures; it asserts nothing. The baseline of the ratios is ``last`` on the same scenes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
METRICS = ("map", "map50", "mean_iou")


def write_world(dest: Path, version: str) -> Path:
    import persrep.data.toy as toy
    from persrep.config import load_settings

    saved = (toy._DENSE_SCALE, dict(toy._CLUTTER))
    if version == "toy-1":
        toy._DENSE_SCALE, toy._CLUTTER["dense"] = (0.3, 0.5), (3, 5)
    try:
        return toy.write_toy_from_settings(dest, load_settings("local", []).data.toy)
    finally:
        toy._DENSE_SCALE, toy._CLUTTER = saved[0], saved[1]


def evaluate(data: Path, mode: str) -> dict[str, float]:
    from persrep.config import load_settings
    from persrep.data.layout import open_dataset, select_instances
    from persrep.evaluation.stage import Evaluator

    settings = load_settings("local", [f"evaluation.dense_features={mode}"])
    ds = open_dataset(str(data))
    names = select_instances(ds, settings.data.instances, settings.data.split, settings.data.max_instances)
    ev = settings.evaluation.model_copy(update={"tasks": ["detection", "segmentation"]})
    bs = settings.personalization.backbones[0]
    t0 = time.perf_counter()
    rows = Evaluator(ds, ev).evaluate_pretrained(bs, names, {"backbone": bs.name})
    out: dict[str, list[float]] = {}
    for r in rows:
        if r.get("metric") in METRICS and r.get("scene", "all") == "all":
            out.setdefault(f"{r['task']}.{r['metric']}", []).append(r["value"])
    res = {k: round(100 * float(np.nanmean(v)), 2) for k, v in sorted(out.items())}
    res["instances"] = len(names)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "dense.json"))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    results: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for version in ("toy-1", "toy-2"):
            data = write_world(Path(tmp) / version, version)
            results[version] = {mode: evaluate(data, mode) for mode in ("last", "hypercolumn")}
            for mode, r in results[version].items():
                print(f"{version:6s} {mode:12s} " + "  ".join(f"{k} {v}" for k, v in r.items()), flush=True)
    ratios = {v: {k: round(r["hypercolumn"][k] / r["last"][k], 2) if r["last"][k] else None
                  for k in ("detection.map", "segmentation.map", "segmentation.mean_iou")}
              for v, r in results.items()}
    doc = {"benchmark": "dense", "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "command": "python bench/dense.py", "wall_s": round(time.perf_counter() - t0, 1),
           "machine": {"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
                       "python": platform.python_version()},
           "settings": "config local: tf_efficientnet_lite0 offline, 8 instances, dense_input_size 256",
           "results": results, "hypercolumn_over_last": ratios}
    Path(args.out).write_text(json.dumps(doc, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
