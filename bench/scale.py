#!/usr/bin/env python
"""Scale simulation: the real stages with trivial work, at 1,000+ units, on s3:// (moto).

What is real: the planners (``plan_synthesis_units``, ``plan_personalize_units``,
``adapter_eval_unit``), the Ray Data synthesis stage (``run_synthesis_stage``: row table, actor
pool, driver-side collection, shards + manifest published per unit), the Tune stage
(``run_personalization_stage``: one trial per unit, checkpoints reported to Tune, experiment state
on s3), the Ray executor (``RayExecutor.map``: one Ray task per evaluation unit), the storage root
(``s3://`` on a moto server in another process that counts every request), manifests, keys and
the re-run that skips everything. What is trivial: the work inside a unit. A synthesis "sample" is
an 8 x 8 image; a personalisation trial reads its positives and negatives units, writes two
small training checkpoints (reported to Tune) and publishes a 256-byte adapter; an evaluation
unit publishes a 1-row parquet. So the figures are the orchestration's cost per unit.

Per phase it records driver wall seconds, driver CPU seconds (user + system of the driver
process, all its threads: what "driver time per unit" means here), the driver's peak RSS (polled),
S3 requests by operation and area (``bench/_s3_counting.py``), and for Tune the experiment
state's objects and bytes on s3. Fake GPUs: ``--gpus`` (default 2) so trials and actors ask
for GPUs as on a GPU cluster (``resources.gpus_per_trial`` fractional); after each stage it checks
that every GPU is free again (the stage's actor pool released).

    python bench/scale.py --units 1000 2000 --stages synthesis,evaluation   # ~15 min on 2 loaded cores
    python bench/scale.py --units 30 90 --rows 3000 --stages synthesis,personalization --out bench/scale_tune.json
    python bench/scale.py --units 20 --rows 400 --out /tmp/scale.json       # a quick look at every stage
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

CATEGORIES = 20
NEGATIVES_PER_CATEGORY = 10


# -- the trivial work units (shipped to Ray workers by value: this is __main__) ------------------
class TinySampler:
    """A generator whose sample is an 8 x 8 image coloured by the row's seed."""

    def sample(self, rows):
        from PIL import Image

        from persrep.generation.base import SampledImage

        return [SampledImage(Image.new("RGB", (8, 8), (r.seed % 256, r.index % 256, 0)), None, r) for r in rows]


def tiny_sampler(ctx, unit):
    return TinySampler()


STEPS = 2  # training steps each trivial trial reports (--steps); the last two write checkpoints


def tiny_train(ctx, unit, progress, steps=None):
    """Read the unit's inputs as training does, report ``STEPS`` steps (a checkpoint at the
    last two) to Tune, publish."""
    from persrep.generation import shards
    from persrep.pipeline.units import ADAPTERS

    n_pos = shards.read_unit(ctx.storage, unit.positives_key, columns=["index", "kept"]).num_rows \
        if unit.positives_key else 0
    n_neg = sum(shards.read_unit(ctx.storage, k, columns=["index", "kept"]).num_rows for k in unit.negatives_keys)
    ckpt = progress.file
    steps = steps or STEPS
    for step in range(1, steps + 1):
        saved = step >= steps - 1
        if saved:
            ckpt.write_bytes(step.to_bytes(4, "little") * 64)  # a 256-byte "training checkpoint"
        progress({"step": step, "steps": steps, "loss": 0.0, "triplet_accuracy": 1.0,
                  "checkpoint": str(ckpt) if saved else None})
    ctx.storage.publish(ADAPTERS, unit.key, {"adapter.safetensors": b"\0" * 256},
                        {"instance": unit.instance, "steps": 2, "positives": n_pos, "negatives": n_neg})
    return {"status": "done", "key": unit.key, "steps": 2}


def tiny_eval(ctx, unit):
    import pyarrow as pa

    from persrep.generation.shards import table_bytes
    from persrep.pipeline.units import EVALUATIONS

    if ctx.storage.is_finished(EVALUATIONS, unit.key):
        return {"status": "skipped", "key": unit.key}
    table = pa.table({"instance": [unit.instance or "all"], "metric": ["ap"], "value": [0.5]})
    ctx.storage.publish(EVALUATIONS, unit.key, {"results.parquet": table_bytes(table)}, {"kind": unit.kind})
    return {"status": "done", "key": unit.key}


# -- measuring -----------------------------------------------------------------------------------
class Phase:
    """Driver wall + CPU seconds, peak RSS (polled) and S3 requests of one phase."""

    def __init__(self, name: str, endpoint: str, prefix: str, units: int, keys: bool = False):
        import psutil

        from synthesis import Sampler  # bench/synthesis.py: the driver RSS / object-store poller

        self.name, self.endpoint, self.prefix, self.units, self.keys = name, endpoint, prefix, units, keys
        self.proc = psutil.Process()
        self.sampler = Sampler(ray_state=False, period=0.1)

    def __enter__(self) -> "Phase":
        from _s3_counting import remote_counts

        remote_counts(self.endpoint, reset_prefix=self.prefix, keys=self.keys)
        self.cpu0 = sum(self.proc.cpu_times()[:2])
        self.sampler.start()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        from _s3_counting import remote_counts

        self.wall = time.perf_counter() - self.t0
        self.cpu = sum(self.proc.cpu_times()[:2]) - self.cpu0
        self.mem = self.sampler.finish()
        self.s3 = remote_counts(self.endpoint)
        keys = self.s3.pop("keys", None)
        if keys is not None:  # what Tune writes: experiment-state snapshots vs per-trial files
            puts = [k for op, k in keys if op == "PUT"]
            self.s3["tune_puts"] = {
                "experiment_state_snapshots": sum("/experiment_state-" in k for k in puts),
                "searcher_state": sum("/basic-variant-state-" in k for k in puts),
                "trial_checkpoint_files": sum("/checkpoint_" in k for k in puts),
                "trial_log_files": sum(k.rsplit("/", 1)[-1] in ("result.json", "progress.csv", "params.json",
                                                                 "params.pkl") or "tfevents" in k for k in puts)}
    def record(self, **extra: Any) -> dict[str, Any]:
        n = max(1, self.units)
        out = {"units": self.units, "wall_s": round(self.wall, 2), "driver_cpu_s": round(self.cpu, 2),
               "driver_cpu_ms_per_unit": round(1000 * self.cpu / n, 2),
               "wall_ms_per_unit": round(1000 * self.wall / n, 2),
               "driver_rss_peak_mib": self.mem["driver_rss_peak_mib"],
               "driver_rss_growth_mib": self.mem["driver_rss_growth_mib"],
               "s3_requests": self.s3["total"], "s3_requests_per_unit": round(self.s3["total"] / n, 2),
               "s3_ops": self.s3["ops"], "s3_ops_per_unit": {k: round(v / n, 2) for k, v in self.s3["ops"].items()},
               "s3_by_area": self.s3["areas"], **({"tune_puts": self.s3["tune_puts"]} if "tune_puts" in self.s3
                                                  else {}), **extra}
        print(f"  {self.name}: {self.units} units, wall {self.wall:.1f} s, driver CPU {1000 * self.cpu / n:.1f} "
              f"ms/unit, RSS peak {self.mem['driver_rss_peak_mib']} MiB, S3 {self.s3['total'] / n:.1f} "
              f"req/unit {self.s3['ops']}", flush=True)
        return out


def tune_state(storage, exp_prefix: str) -> dict[str, Any]:
    """Objects and bytes of the Tune experiment on s3: experiment state vs trial checkpoints."""
    files = storage.list_files(exp_prefix)
    state = [(f, s) for f, s in files if "/" not in f]
    ckpts = [(f, s) for f, s in files if "/checkpoint_" in f]
    return {"objects": len(files), "bytes": sum(s for _, s in files),
            "experiment_level_objects": len(state), "experiment_level_bytes": sum(s for _, s in state),
            "largest_experiment_state_bytes": max((s for f, s in state if f.startswith("experiment_state")),
                                                  default=0),
            "checkpoint_objects": len(ckpts), "checkpoint_bytes": sum(s for _, s in ckpts)}


def gpus_free(wait_s: float = 10.0) -> bool:
    """Every GPU of the cluster free again (within ``wait_s``: Ray returns resources asynchronously)."""
    import ray

    deadline = time.monotonic() + wait_s
    while True:
        total, free = ray.cluster_resources().get("GPU", 0), ray.available_resources().get("GPU", 0)
        if abs(total - free) < 1e-6 or time.monotonic() > deadline:
            return abs(total - free) < 1e-6
        time.sleep(0.2)


def simulate(n: int, rows: int, endpoint: str, bucket: str, gpus: int, keep: int | None,
             concurrent: int, stages: set[str], report_every: int | None) -> dict[str, Any]:
    from persrep.config import load_settings
    from persrep.distributed.ray_executor import RayExecutor
    from persrep.distributed.synthesis import SynthesisStage
    from persrep.distributed.tune_stage import PersonalizationStage, experiment_name, trial_resources
    from persrep.pipeline.context import RunContext
    from persrep.pipeline.resource_plan import Resources
    from persrep.pipeline.stages.evaluation import adapter_eval_unit
    from persrep.pipeline.stages.personalization import plan_personalize_units
    from persrep.pipeline.stages.synthesis import plan_synthesis_units
    from persrep.storage import Storage

    prefix = f"n{n}-{os.urandom(3).hex()}"
    positives = max(1, rows // n)
    overrides = [f"storage.root=s3://{bucket}/{prefix}", f"storage.s3_endpoint={endpoint}",
                 "generator.types=[cut_paste]", "personalization.negatives=generated",
                 f"synthesis.num_positives={positives}",
                 f"synthesis.num_negatives_per_category={NEGATIVES_PER_CATEGORY}", "synthesis.filter.enabled=false",
                 "synthesis.batch_size=16", "synthesis.rows_per_shard=256",
                 "resources.cpus_per_actor=0.25", "resources.cpus_per_trial=0.1",
                 f"resources.gpus_per_tune_trial={gpus / concurrent:g}", "resources.max_retries=1"]
    if keep is not None:
        overrides.append(f"resources.tune_checkpoints_to_keep={keep}")
    if report_every is not None:
        overrides.append(f"resources.tune_report_every={report_every}")
    settings = load_settings("local", overrides)
    storage = Storage.from_settings(settings.storage)
    instances = {f"obj{i:05d}": f"cat{i % CATEGORIES:02d}" for i in range(n)}
    ctx = RunContext(settings, storage, "sim://not-read", instances, "sim-dataset", f"sim{n}")
    say = lambda m: None  # noqa: E731 - the stages' lines are not what is measured
    out: dict[str, Any] = {"units": n, "rows_per_instance": positives, "prefix": prefix,
                           "overrides": overrides, "stages": sorted(stages), "trial_steps": STEPS}
    print(f"n={n}: {n} instances x {positives} rows + {CATEGORIES} x {NEGATIVES_PER_CATEGORY} negatives", flush=True)

    for attempt in ("first", "rerun"):
        res: dict[str, Any] = {}
        t = time.perf_counter()
        syn_units = plan_synthesis_units(ctx, {})
        res["plan_synthesis_s"] = round(time.perf_counter() - t, 3)
        n_rows = sum(len(u.rows) for u in syn_units)
        with Phase("synthesis", endpoint, prefix, len(syn_units)) as ph:
            outs = SynthesisStage(ctx, say, sampler_factory=tiny_sampler, use_gpus=True,
                                  no_progress_timeout_s=600).run(syn_units)
        assert all(o.status in ("done", "skipped") for o in outs), [o.error for o in outs if o.status == "failed"][:3]
        st = outs.stats
        res["synthesis"] = ph.record(rows=n_rows, driver_cpu_ms_per_row=round(1000 * ph.cpu / max(1, n_rows), 3),
                                     actors=st.get("actors"), batches=st.get("batches"),
                                     first_output_s=st.get("first_output_s"),
                                     cold_start=st.get("cold_start"), gpus_free_after=gpus_free(),
                                     done=sum(o.status == "done" for o in outs),
                                     skipped=sum(o.status == "skipped" for o in outs))
        synthesized = {u.group: u.key for u in syn_units}
        with Phase("plan_personalize", endpoint, prefix, n) as ph:
            pz_units = plan_personalize_units(ctx, synthesized)
        res["plan_personalize"] = ph.record()
        assert len(pz_units) == n, len(pz_units)
        labels = [f"{u.config.label}:{u.backbone.name}:{u.instance}" for u in pz_units]
        if "personalization" in stages:
            with Phase("personalization", endpoint, prefix, n, keys=True) as ph:
                pz = PersonalizationStage(ctx, say, unit_fn=tiny_train,
                                          max_concurrent_trials=concurrent).run(pz_units, labels)
            assert all(o.status in ("done", "skipped") for o in pz), \
                [o.error for o in pz if o.status == "failed"][:3]
            res["personalization"] = ph.record(done=sum(o.status == "done" for o in pz),
                                               skipped=sum(o.status == "skipped" for o in pz),
                                               gpus_free_after=gpus_free(),
                                               gpus_per_trial=trial_resources(settings).get("gpu", 0.0))
            if attempt == "first":
                res["personalization"]["tune_experiment"] = tune_state(
                    storage, f".tune/{experiment_name(pz_units)}")
        ev_units = [adapter_eval_unit(ctx, u) for u in pz_units]
        if "evaluation" not in stages:
            out[attempt] = res
            continue
        with Phase("evaluation", endpoint, prefix, len(ev_units)) as ph:
            ev = RayExecutor(1).map(tiny_eval, ctx, ev_units, [f"adapter:{u['instance']}" for u in ev_units],
                                    Resources(cpus=0.1, gpus=gpus / concurrent), "evaluation")
        assert all(o.status in ("done", "skipped") for o in ev)
        res["evaluation"] = ph.record(done=sum(o.status == "done" for o in ev),
                                      skipped=sum(o.status == "skipped" for o in ev), gpus_free_after=gpus_free())
        out[attempt] = res
    out["objects_in_root"] = len(storage.list_files())
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", type=int, nargs="+", default=[1000, 2000], help="personalisation units per run")
    ap.add_argument("--rows", type=int, default=100_000, help="synthesis rows (positives) per run")
    ap.add_argument("--gpus", type=int, default=1, help="fake GPUs of the local Ray cluster")
    ap.add_argument("--concurrent", type=int, default=2, help="trials at once (gpus_per_trial = gpus / this)")
    ap.add_argument("--keep", type=int, default=None, help="resources.tune_checkpoints_to_keep (default: unset)")
    ap.add_argument("--stages", default="synthesis,personalization,evaluation",
                    help="stages to run (synthesis always runs: the others read its units)")
    ap.add_argument("--steps", type=int, default=2, help="steps each trivial trial reports to Tune")
    ap.add_argument("--report-every", type=int, default=None, help="resources.tune_report_every")
    ap.add_argument("--out", default=str(REPO / "bench" / "scale.json"))
    args = ap.parse_args()
    global STEPS
    STEPS = args.steps

    import ray

    server = subprocess.Popen([sys.executable, str(REPO / "bench" / "_s3_counting.py")], stdout=subprocess.PIPE,
                              text=True)
    try:
        endpoint = server.stdout.readline().strip()
        os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
                           "RAY_AUTH_MODE": "disabled"})
        import boto3

        bucket = "persrep-scale"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        load_start = os.getloadavg()
        ray.init(address="local", num_cpus=os.cpu_count() or 2, num_gpus=args.gpus, include_dashboard=False,
                 log_to_driver=False)
        runs = []
        try:
            for n in args.units:
                runs.append(simulate(n, args.rows, endpoint, bucket, args.gpus, args.keep, args.concurrent,
                                     set(args.stages.split(",")), args.report_every))
        finally:
            ray.shutdown()
    finally:
        server.terminate()
        server.wait(timeout=30)
    doc = {"benchmark": "scale simulation: real stages, trivial work, s3 on loopback (moto)",
           "command": "python bench/scale.py " + " ".join(sys.argv[1:]),
           "timestamp": dt.datetime.now().isoformat(timespec="seconds"),
           "settings": {"gpus_fake": args.gpus, "concurrent_trials": args.concurrent, "rows": args.rows,
                        "tune_checkpoints_to_keep": args.keep, "categories": CATEGORIES,
                        "negatives_per_category": NEGATIVES_PER_CATEGORY},
           "runs": runs,
           "machine": {"platform": platform.platform(), "python": platform.python_version(),
                       "cpus": os.cpu_count(), "ray": ray.__version__,
                       "loadavg_start": [round(x, 2) for x in load_start],
                       "loadavg_end": [round(x, 2) for x in os.getloadavg()]}}
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
