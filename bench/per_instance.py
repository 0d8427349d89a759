#!/usr/bin/env python
"""Where a real-photo instance's time goes (personalisation + evaluation), before and after the
frozen-prefix cache, in the same run, with the results compared.

Data: the COIL composites exactly as ``bench/quality.py`` builds them (COIL-100 subset with its
masks, views 0/24/48 as train photos, PODS-style test and dense scenes on real backgrounds, 3
held-out objects as distractors); negatives: the DreamBooth photos (external to the pool).
Model: the real offline EfficientNet-Lite0 (``offline-real``: 160 px, dense 448 px, 40 steps).

Per instance: cut-and-paste positives, then per path one adapter trained (``train_one_instance``)
and evaluated on all four tasks:

- ``baseline`` (what main did): ``personalization.channels_last=false``,
  ``evaluation.prefix_cache=false``: every model embeds every pool with the full forward;
- ``optimised``: ``personalization.channels_last=true`` (training convs in channels_last memory
  format) and ``evaluation.prefix_cache=true``: the frozen stem + ``blocks[:5]`` run once per
  pool per process (``persrep.evaluation.prefix_pool``), each model runs only its adapted tail.

Then the baseline adapter is also evaluated through the prefix cache: its rows must equal the
baseline's (``prefix_cache_same_adapter_compared``: exactness of the cache alone), and the two
adapters' rows are compared (``channels_last_adapter_compared``: channels_last training is the
same maths in another float summation order, so adapters and metrics agree to a tolerance).

The pretrained backbone is evaluated once per path too (it is one unit per backbone; in the
optimised path it also fills the process's prefix cache, so its cost is counted, not hidden).
Per path and stage: seconds of training, global pool embedding, the dense pool (embedded and
cached for the pretrained model; for an adapter streamed while the dense tasks run, so their time
includes it), the report's examples, each task, and the result rows compared (max |diff|
over every metric value; ``identical`` when all equal). The frozen prefix cannot be cached for
training inputs: they are re-augmented every step (flip, rotation, random resized crop), so their
prefix activations never repeat; channels_last is the training lever instead.

    .venv/bin/python bench/per_instance.py                 # 2 instances, ~10 min on 2 free cores
    .venv/bin/python bench/per_instance.py --instances 3 --threads 2

Writes ``bench/per_instance.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import quality  # noqa: E402  (bench/quality.py: the COIL composites, negatives, cut-and-paste)
from persrep.config import load_settings  # noqa: E402
from persrep.contrastive.train import TrainingData, train_one_instance  # noqa: E402
from persrep.data.composite import CompositeSettings  # noqa: E402
from persrep.data.layout import open_dataset  # noqa: E402
from persrep.evaluation import prefix_pool, suite  # noqa: E402
from persrep.evaluation.stage import Evaluator  # noqa: E402

PATHS = ("baseline", "optimised")


class Timer:
    """Seconds per named part, accumulated by wrapping the library's own functions."""

    def __init__(self):
        self.parts: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def wrap(self, owner, attr: str, part: str):
        original = getattr(owner, attr)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                self.parts[part] += time.perf_counter() - t0

        setattr(owner, attr, timed)
        try:
            yield
        finally:
            setattr(owner, attr, original)

    def take(self) -> dict[str, float]:
        out = {k: round(v, 2) for k, v in self.parts.items()}
        self.parts.clear()
        return out


def evaluate(path: str, ds, settings, bs, timer: Timer, run) -> tuple[list[dict], dict[str, float]]:
    ev = settings.evaluation.model_copy(update={"prefix_cache": path == "optimised"})
    evaluator = Evaluator(ds, ev)
    with contextlib.ExitStack() as stack:
        stack.enter_context(timer.wrap(Evaluator, "_global_pool", "global_pool_embedding"))
        stack.enter_context(timer.wrap(Evaluator, "_dense_inputs", "dense_pool_setup_and_cached_embedding"))
        stack.enter_context(timer.wrap(Evaluator, "_examples", "report_examples"))
        stack.enter_context(timer.wrap(suite, "evaluate_classification", "classification"))
        stack.enter_context(timer.wrap(suite, "evaluate_retrieval", "retrieval"))
        stack.enter_context(timer.wrap(suite, "evaluate_dense", "dense_tasks_incl_embedding"))
        t0 = time.perf_counter()
        rows = run(evaluator, bs)
        total = time.perf_counter() - t0
    parts = timer.take()
    parts["total"] = round(total, 2)
    return rows, parts


def compare(a: list[dict], b: list[dict]) -> dict:
    key = lambda r: (r["instance"], r["task"], r["metric"], r["scene"])  # noqa: E731
    va = {key(r): r["value"] for r in a}
    vb = {key(r): r["value"] for r in b}
    if va.keys() != vb.keys():
        return {"same_rows": False}
    diffs = [abs(va[k] - vb[k]) for k in va if not (np.isnan(va[k]) and np.isnan(vb[k]))]
    return {"same_rows": True, "n_values": len(va), "identical": all(d == 0 for d in diffs),
            "max_abs_diff": float(max(diffs)) if diffs else 0.0}


def adapter_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    return float(max((ta[k] - tb[k]).abs().max() for k in ta))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value")
    ap.add_argument("--instances", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    ap.add_argument("--work", default=os.environ.get("PERSREP_BENCH_WORK", "/tmp/persrep-bench"))
    ap.add_argument("--out", default=str(REPO / "bench" / "per_instance.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    overrides = ['evaluation.tasks=["classification","retrieval","detection","segmentation"]',
                 "generator.cut_paste.backgrounds=@data/backgrounds", *args.overrides]
    settings = load_settings("offline-real", overrides)
    pz, bs = settings.personalization, settings.personalization.backbones[0]
    shared = quality.shared_data_dir()
    cs = CompositeSettings(seed=0, test_per_instance=24, dense_per_instance=4, negative_instances=3)
    work = Path(args.work)
    coil, comp, _ = quality.prepare_data(work, shared, cs)
    ds = open_dataset(str(comp))
    names = [ds.names[i] for i in np.random.default_rng(0).permutation(len(ds.names))][: args.instances]
    timer = Timer()
    record: dict = {"pretrained": {}, "instances": {}}
    rows: dict[str, list[dict]] = {p: [] for p in PATHS}
    for path in PATHS:
        prefix_pool.clear_process_cache()
        r, parts = evaluate(path, ds, settings, bs, timer,
                            lambda e, b: e.evaluate_pretrained(b, ds.names, {"model_path": path}))
        rows[path] += r
        record["pretrained"][path] = parts
        quality.log(f"pretrained {path}: {parts}")
    negatives, neg_source, _ = quality.negatives_pool("dreambooth", shared=shared, coil=coil, comp=comp,
                                                      ds=ds, instance=names[0])
    for name in names:
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            t0 = time.perf_counter()
            positives, _ = quality.cut_paste_positives(settings, ds, name, comp, pz.num_positives, Path(tmp))
            synth_s = time.perf_counter() - t0
            anchors = [ds.read_image(p) for p in ds.instances[name].train]
            data = TrainingData(name, anchors, positives, negatives, "synthetic", neg_source)
            entry: dict = {"cut_paste_positives_s": round(synth_s, 2)}
            adapters = {}
            for path in PATHS:  # training: baseline contiguous, optimised channels_last
                t0 = time.perf_counter()
                res = train_one_instance(pz.model_copy(update={"channels_last": path == "optimised"}), bs,
                                         data, Path(tmp) / f"train-{path}")
                entry[f"training_{path}_s"] = round(time.perf_counter() - t0, 2)
                entry[f"final_loss_{path}"] = res.metrics["final_loss"]
                adapters[path] = res.adapter_path
            entry["adapter_max_abs_diff"] = adapter_diff(adapters["baseline"], adapters["optimised"])
            for path in PATHS:  # the optimised path reuses the prefix cache its pretrained run filled
                r, parts = evaluate(path, ds, settings, bs, timer,
                                    lambda e, b: e.evaluate_adapter(b, name, adapters[path],
                                                                    {"model_path": path}))
                rows[path] += r
                entry[f"evaluation_{path}"] = parts
            # the prefix cache alone on the *same* adapter: must give the baseline's rows
            same, _ = evaluate("optimised", ds, settings, bs, timer,
                               lambda e, b: e.evaluate_adapter(b, name, adapters["baseline"], {}))
            mine = lambda rs: [r for r in rs if r["instance"] == name and r["model"] == "personalised"]  # noqa: E731
            entry["prefix_cache_same_adapter_compared"] = compare(mine(rows["baseline"]), mine(same))
            entry["channels_last_adapter_compared"] = compare(mine(rows["baseline"]), mine(rows["optimised"]))
            record["instances"][name] = entry
            quality.log(f"{name}: {json.dumps(entry)}")
    n = len(names)
    per_inst = {}
    for path in PATHS:
        train = sum(e[f"training_{path}_s"] for e in record["instances"].values()) / n
        ev_adapter = sum(e[f"evaluation_{path}"]["total"] for e in record["instances"].values()) / n
        pre = record["pretrained"][path]["total"]
        per_inst[path] = {"training_s": round(train, 2), "adapter_evaluation_s": round(ev_adapter, 2),
                          "pretrained_evaluation_s (once per backbone)": pre,
                          "personalisation_plus_evaluation_s": round(train + ev_adapter, 2)}
    b, o = per_inst["baseline"], per_inst["optimised"]
    ratios = {"adapter_evaluation": round(b["adapter_evaluation_s"] / o["adapter_evaluation_s"], 2),
              "training": round(b["training_s"] / o["training_s"], 2),
              "pretrained_evaluation": round(record["pretrained"]["baseline"]["total"]
                                             / record["pretrained"]["optimised"]["total"], 2),
              "personalisation_plus_evaluation": round(b["personalisation_plus_evaluation_s"]
                                                       / o["personalisation_plus_evaluation_s"], 2)}
    doc = {"benchmark": "per_instance",
           "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "command": "bench/per_instance.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": quality.machine_info(), "threads": args.threads,
           "settings": {"config": "offline-real", "overrides": overrides, "image_size": bs.image_size,
                        "dense_input_size": settings.evaluation.dense_input_size, "steps": pz.max_steps,
                        "batch_size": pz.batch_size, "eval_batch_size": settings.evaluation.batch_size},
           "data": {"instances_in_pool": len(ds.names), "test_images": len(Evaluator(ds, settings.evaluation).pools.test),
                    "dense_images": len(Evaluator(ds, settings.evaluation).pools.dense),
                    "gallery_images": len(Evaluator(ds, settings.evaluation).pools.train)},
           "per_instance_mean": per_inst, "ratios_baseline_over_optimised": ratios,
           "pretrained_results_compared": compare(
               [r for r in rows["baseline"] if r["model"] == "pretrained"],
               [r for r in rows["optimised"] if r["model"] == "pretrained"]),
           "pretrained": record["pretrained"], "instances": record["instances"],
           "wall_s": round(time.perf_counter() - t_start, 1)}
    out = Path(args.out)
    tmp = out.with_suffix(".json.partial")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, out)
    print(json.dumps({"per_instance_mean": per_inst, "ratios": ratios,
                      "pretrained_results_compared": doc["pretrained_results_compared"],
                      "prefix_cache_same_adapter": {k: v["prefix_cache_same_adapter_compared"]
                                                    for k, v in record["instances"].items()},
                      "channels_last_adapters": {k: v["channels_last_adapter_compared"]
                                                 for k, v in record["instances"].items()}},
                     indent=1))
    quality.log(f"wrote {out}; wall {doc['wall_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
