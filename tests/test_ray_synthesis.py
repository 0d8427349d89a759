"""The synthesis stage on Ray Data (persrep.distributed.synthesis) against the in-process path.

One tiny toy world on a real moto S3 server for the whole module: generators are trained once,
the in-process rows (``run_synthesis_unit``) are drawn once; each test clears ``synthesis/`` and
runs the Ray Data stage on the shared local Ray (2 CPUs + 1 fake GPU), or, for the multi-node
test, on a ``ray.cluster_utils.Cluster`` in a subprocess.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from persrep.pipeline.stages.synthesis import open_sampler as ORIGINAL_SAMPLER  # before any test monkeypatches it

pytestmark = pytest.mark.ray

TINY = ["data.toy.categories=2", "data.toy.instances_per_category=2", "data.toy.image_size=64",
        "data.toy.test_per_scene=2", "data.toy.negatives_per_category=6",
        "generator.types=[real_only, cut_paste, dreambooth]",
        "generator.dreambooth.steps=2", "generator.dreambooth.num_class_images=2",
        "synthesis.num_positives=4", "synthesis.num_negatives_per_category=4",
        "synthesis.inference_steps=2", "synthesis.resolution=32",
        "synthesis.batch_size=3", "synthesis.rows_per_shard=3",  # chunks of 3+1, two shards per unit
        "personalization.negatives=generated",  # so the base model's negatives pools are synthesised
        "personalization.backbones=[{name: tf_efficientnet_lite0, weights: offline, image_size: 64}]"]


def tiny_settings(root: str, *extra: str):
    from persrep.config import load_settings

    return load_settings("local", [*TINY, f"storage.root={root}", *extra])


def plan_units(ctx, ready=None):
    """The synthesis units exactly as ``run_pipeline`` builds them: the pipeline's own planners
    (``ready``: the trained generators; default: every one planned, as the world trained them)."""
    from persrep.pipeline.stages.generator_prep import plan_generator_units
    from persrep.pipeline.stages.synthesis import plan_synthesis_units

    if ready is None:
        ready = {(u.generator, u.instance): u.key for u in plan_generator_units(ctx)}
    return plan_synthesis_units(ctx, ready)


def unit_rows(storage, units) -> dict[str, list[dict]]:
    from persrep.generation.shards import read_unit

    return {u.key: read_unit(storage, u.key, kept_only=False).to_pylist() for u in units}


def clear_synthesis(storage) -> None:
    storage.delete_dir("synthesis")
    assert storage.list_finished("synthesis") == []


# -- faults injected through the sampler factory (pickled by value into the actors) -----------
class FaultySampler:
    """Wraps a real sampler; misbehaves on the row with seed ``seed``."""

    def __init__(self, inner, seed: int, mode: str, marker: str):
        self.inner, self.seed, self.mode, self.marker = inner, seed, mode, marker

    def sample(self, rows):
        if any(r.seed == self.seed for r in rows):
            if self.mode == "exit" and not Path(self.marker).exists():
                Path(self.marker).write_text(str(os.getpid()))
                os._exit(1)  # the actor process dies mid-batch, once
            if self.mode == "raise":
                with Path(self.marker).open("a") as f:
                    f.write(f"{len(rows)}\n")  # one line per call on that row
                raise ValueError(f"bad row {self.seed}")
        return self.inner.sample(rows)


def faulty_factory(ctx, unit, *, seed: int, mode: str, marker: str):
    if mode == "load" and unit.instance == marker:  # this instance's generators cannot be loaded
        raise OSError(f"cannot load generator for {unit.instance}")
    if mode == "reject" and unit.instance == marker:  # deterministic: the same inputs fail again
        raise ValueError(f"cut_paste {unit.instance}: train mask 2 is empty")
    return FaultySampler(ORIGINAL_SAMPLER(ctx, unit), seed, mode, marker)


@contextlib.contextmanager
def one_thread():
    """CPU pixels depend on torch's thread count (by a rounding step, in a few pixels); the
    stage's actors (0.5 CPU each) run 1 thread, so the in-process reference does too."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# -- the shared world -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(s3_server, ray_local):
    """A toy world on moto S3, its generators trained, and the in-process rows of every unit."""
    import boto3
    import ray

    from persrep.pipeline.context import prepare_run
    from persrep.pipeline.stages.generator_prep import run_generator_unit
    from persrep.pipeline.stages.synthesis import run_synthesis_unit

    t0 = time.perf_counter()
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    bucket = "persrep-raysyn-" + os.urandom(3).hex()
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    root = f"s3://{bucket}/x"
    ctx = prepare_run(tiny_settings(root), run_id="t")
    from persrep.pipeline.stages.base_images import plan_shared_units, run_shared_unit
    from persrep.pipeline.stages.generator_prep import plan_generator_units

    for u in plan_shared_units(ctx.settings, ctx.instances):  # DreamBooth's class images, as the pipeline
        run_shared_unit(ctx, u)
    gen_units = plan_generator_units(ctx)
    for u in gen_units:
        run_generator_unit(ctx, u)
    t_prep = time.perf_counter() - t0
    units = plan_units(ctx, {(u.generator, u.instance): u.key for u in gen_units})
    t1 = time.perf_counter()
    with one_thread():
        for u in units:
            assert run_synthesis_unit(ctx, u)["status"] == "done"
    print(f"world: prep {t_prep:.1f} s, in-process synthesis {time.perf_counter() - t1:.1f} s")
    baseline = unit_rows(ctx.storage, units)
    clear_synthesis(ctx.storage)
    return {"root": root, "ctx": ctx, "units": units, "baseline": baseline}


@pytest.fixture
def fresh(world):
    clear_synthesis(world["ctx"].storage)
    return world


def _assert_rows_equal(got: dict[str, list[dict]], want: dict[str, list[dict]]) -> None:
    assert set(got) == set(want)
    for key, b in want.items():
        a = got[key]
        assert [(r["index"], r["seed"]) for r in a] == [(r["index"], r["seed"]) for r in b], key
        assert a == b, f"unit {key}: rows differ from the in-process path"


def _exactly_once(rows: dict[str, list[dict]], units) -> None:
    for u in units:
        idx = [r["index"] for r in rows[u.key]]
        assert sorted(idx) == sorted(r.index for r in u.rows), f"{u.group}: missing or duplicated rows"


# -- tests ------------------------------------------------------------------------------------
def test_rows_equal_in_process_and_each_generator_loads_once_per_actor(fresh):
    from persrep.distributed.synthesis import SynthesisStage

    ctx, units = fresh["ctx"], fresh["units"]
    said: list[str] = []
    outs = SynthesisStage(ctx, said.append, max_retries=1, no_progress_timeout_s=120).run(units)
    assert [o.status for o in outs] == ["done"] * len(units), [(o.label, o.error) for o in outs]
    assert [o.label for o in outs] == [u.group for u in units]
    got = unit_rows(ctx.storage, units)
    _assert_rows_equal(got, fresh["baseline"])          # same pixels, same order, same shards' rows
    assert sum(len(v) for v in got.values()) == 40       # 8 positive units x 4 + 2 negative pools x 4
    st = outs.stats
    samplers = {(u.generator, u.generator_key, u.instance) for u in units}
    assert len(samplers) == 10
    # the fake GPU gives one actor with num_gpus=1: each generator loaded exactly once, though
    # every unit spans two batches (chunks of 3 + 1 rows)
    assert st["actors"] == 1 and st["loads"] == len(samplers)
    assert all(v["loads"] == 1 for v in st["per_instance"].values()), st["per_instance"]
    assert st["duplicates"] == 0 and st["errors"] == 0 and st["rows"] == 40
    assert any("generator load" in m for m in said) and any("dreambooth:mug_0" in m for m in said)
    # published like run_synthesis_unit: two shards (3 + 1 rows) and a manifest with counts
    man = ctx.storage.manifest("synthesis", units[0].key)
    assert sorted(man.files) == ["part-00000.parquet", "part-00001.parquet"]
    assert man.meta["rows"] == 4 and man.meta["errors"] == 0 and man.meta["group"] == units[0].group


def test_resume_generates_only_missing_units_and_rerun_generates_nothing(fresh):
    from persrep.distributed.synthesis import SynthesisStage
    from persrep.pipeline.stages.synthesis import run_synthesis_unit

    ctx, units = fresh["ctx"], fresh["units"]
    # a run killed midway: some units published, one left half-written (a shard, no manifest)
    with one_thread():
        for u in units[::3]:
            run_synthesis_unit(ctx, u)
    half = units[1]
    ctx.storage.write_bytes(f"synthesis/{half.key}/part-00000.parquet", b"truncated by a crash")
    said: list[str] = []
    outs = SynthesisStage(ctx, said.append, max_retries=0, use_gpus=False, num_actors=2,
                          no_progress_timeout_s=120).run(units)
    published_before = {u.key for u in units[::3]}
    assert [o.status for o in outs] == ["skipped" if u.key in published_before else "done" for u in units]
    assert outs.stats["rows"] == sum(len(u.rows) for u in units if u.key not in published_before)
    _assert_rows_equal(unit_rows(ctx.storage, units), fresh["baseline"])
    # 2 CPU actors at 0.5 CPU: at most one load per (actor, generator), never one per batch
    st = outs.stats
    assert st["actors"] == 2
    served = {(u.generator, u.generator_key, u.instance) for u in units if u.key not in published_before}
    assert len(served) <= st["loads"] <= st["actors"] * len(served)
    # the same settings again: nothing to generate, and it says so
    said.clear()
    again = SynthesisStage(ctx, said.append, max_retries=0).run(units)
    assert [o.status for o in again] == ["skipped"] * len(units)
    assert again.stats["loads"] == 0 and again.stats["passes"] == 0
    assert any("nothing to generate" in m for m in said)


def test_actor_killed_mid_batch_loses_and_doubles_no_row(fresh, tmp_path):
    from persrep.distributed.synthesis import SynthesisStage

    ctx, units = fresh["ctx"], fresh["units"]
    victim = next(u for u in units if u.generator == "dreambooth").rows[1]
    marker = tmp_path / "killed"
    factory = functools.partial(faulty_factory, seed=victim.seed, mode="exit", marker=str(marker))
    outs = SynthesisStage(ctx, None, max_retries=1, use_gpus=False, num_actors=2,
                          sampler_factory=factory, no_progress_timeout_s=120).run(units)
    assert marker.exists(), "the fault was not triggered"
    assert [o.status for o in outs] == ["done"] * len(units), [(o.label, o.error) for o in outs]
    got = unit_rows(ctx.storage, units)
    _exactly_once(got, units)
    _assert_rows_equal(got, fresh["baseline"])
    assert outs.stats["duplicates"] == 0
    # recovered inside the pass by Ray (actor restart + task retry), not by the stage's next pass
    assert outs.stats["passes"] == 1 and all(o.attempts == 1 for o in outs)
    assert outs.stats["incarnations"] >= 2  # the restarted actor is a new process with an empty cache


def test_a_row_that_raises_is_recorded_alone_and_matches_in_process(fresh, tmp_path, monkeypatch):
    from persrep.distributed.synthesis import SynthesisStage
    from persrep.pipeline.stages import synthesis as work
    from persrep.pipeline.stages.synthesis import FIX_ERRORS
    from persrep.pipeline.units import UnitRejected

    ctx, units = fresh["ctx"], fresh["units"]
    unit = next(u for u in units if u.generator == "cut_paste")
    bad = unit.rows[1]
    marker = tmp_path / "calls"
    factory = functools.partial(faulty_factory, seed=bad.seed, mode="raise", marker=str(marker))
    outs = SynthesisStage(ctx, None, max_retries=0, use_gpus=False, num_actors=2,
                          sampler_factory=factory, no_progress_timeout_s=120).run(units)
    # the unit is published (its rows are data) but failed: a row error is beyond max_row_errors=0
    assert [o.status for o in outs] == ["failed" if u is unit else "done" for u in units]
    bad_out = outs[units.index(unit)]
    assert bad_out.error == (f"1 of 4 rows failed to generate (synthesis.max_row_errors=0); first: "
                             f"ValueError: bad row {bad.seed}; {FIX_ERRORS}")
    assert bad_out.value["error_messages"] == [f"ValueError: bad row {bad.seed}"] and bad_out.attempts == 1
    assert outs.stats["errors"] == 1
    assert marker.read_text().split() == ["3", "1"]  # its batch of 3 first, then the row alone
    got = unit_rows(ctx.storage, units)
    rows = got[unit.key]
    failed = [r for r in rows if r["error"]]
    assert [(r["index"], r["error"], r["image"], r["kept"]) for r in failed] == \
        [(bad.index, f"ValueError: bad row {bad.seed}", None, False)]
    assert ctx.storage.manifest("synthesis", unit.key).meta["errors"] == 1
    ok = {k: v for k, v in got.items() if k != unit.key}
    _assert_rows_equal(ok, {k: v for k, v in fresh["baseline"].items() if k != unit.key})
    assert [r for r in rows if not r["error"]] == [r for r in fresh["baseline"][unit.key] if r["index"] != bad.index]
    # the in-process path with the same faulty generator writes the very same rows
    clear_synthesis(ctx.storage)
    monkeypatch.setattr(work, "open_sampler", factory)
    with one_thread(), pytest.raises(UnitRejected) as rejected:
        work.run_synthesis_unit(ctx, unit)
    assert str(rejected.value) == bad_out.error and rejected.value.details == bad_out.value
    assert unit_rows(ctx.storage, [unit])[unit.key] == rows


def test_a_generator_that_cannot_load_fails_its_unit_only_after_retries(fresh):
    from persrep.distributed.synthesis import SynthesisStage

    ctx, units = fresh["ctx"], fresh["units"]
    broken = next(u for u in units if u.generator == "dreambooth" and u.instance == "mug_1")
    factory = functools.partial(faulty_factory, seed=-1, mode="load", marker="mug_1")
    said: list[str] = []
    outs = SynthesisStage(ctx, said.append, max_retries=1, use_gpus=False, num_actors=2,
                          sampler_factory=factory, no_progress_timeout_s=120).run(units)
    by_key = {u.key: o for u, o in zip(units, outs)}
    failed = [o for o in outs if o.status == "failed"]
    # every unit of instance mug_1 (cut_paste and dreambooth positives) fails: two passes, then reported
    assert {o.label for o in failed} == {u.group for u in units if u.instance == "mug_1"}
    assert by_key[broken.key].error == "OSError: cannot load generator for mug_1"
    assert by_key[broken.key].attempts == 2 and outs.stats["passes"] == 2
    assert not ctx.storage.is_finished("synthesis", broken.key)  # nothing half-published
    assert any("retrying" in m for m in said)
    ok = [u for u in units if u.instance != "mug_1"]
    assert all(by_key[u.key].status == "done" and by_key[u.key].attempts == 1 for u in ok)
    _assert_rows_equal(unit_rows(ctx.storage, ok), {u.key: fresh["baseline"][u.key] for u in ok})


def test_a_generator_that_fails_deterministically_fails_its_unit_once(fresh):
    """Issue #29: a load failure the retry policy rejects (an empty train mask) is not tried again
    in a later pass: its units fail after one attempt, in one line; the others are done."""
    from persrep.distributed.synthesis import SynthesisStage

    ctx, units = fresh["ctx"], fresh["units"]
    factory = functools.partial(faulty_factory, seed=-1, mode="reject", marker="mug_1")
    said: list[str] = []
    outs = SynthesisStage(ctx, said.append, max_retries=2, use_gpus=False, num_actors=2,
                          sampler_factory=factory, no_progress_timeout_s=120).run(units)
    failed = [o for o in outs if o.status == "failed"]
    assert {o.label for o in failed} == {u.group for u in units if u.instance == "mug_1"}
    assert all(o.attempts == 1 and "\n" not in o.error for o in failed)
    assert failed[0].error.startswith("ValueError: cut_paste mug_1: train mask 2 is empty")
    assert outs.stats["passes"] == 1 and not any("retrying" in m for m in said)
    assert all(o.status == "done" for u, o in zip(units, outs) if u.instance != "mug_1")


def test_filtered_units_keep_every_attempt_in_the_in_process_order(fresh):
    """With the perceptual filter on, a unit holds every attempt (rejected ones without pixels);
    the Ray stage writes the same attempts, scores and order as ``run_synthesis_unit``."""
    import dataclasses

    from persrep.distributed.synthesis import SynthesisStage
    from persrep.pipeline.stages.synthesis import run_synthesis_unit

    base = fresh["ctx"]
    settings = tiny_settings(fresh["root"], "synthesis.filter.enabled=true", "synthesis.filter.scorer=embedding",
                             "synthesis.filter.threshold=0.75", "synthesis.filter.max_attempts_per_image=3",
                             "synthesis.filter.on_empty=real_only")  # rows, not the verdict, are compared here
    ctx = dataclasses.replace(base, settings=settings)
    units = [u for u in plan_units(ctx) if u.generator == "cut_paste"]
    with one_thread():
        for u in units:
            run_synthesis_unit(ctx, u)
    want = unit_rows(ctx.storage, units)
    clear_synthesis(ctx.storage)
    outs = SynthesisStage(ctx, None, max_retries=0, use_gpus=False, num_actors=2,
                          no_progress_timeout_s=120).run(units)
    assert [o.status for o in outs] == ["done"] * len(units)
    got = unit_rows(ctx.storage, units)
    attempts = sum(len(v) for v in want.values())
    rejected = sum(not r["kept"] for v in want.values() for r in v)
    assert rejected > 0 and attempts > sum(len(u.rows) for u in units), (attempts, rejected)  # redraws happened
    _assert_rows_equal(got, want)


CLUSTER_SCRIPT = textwrap.dedent('''
    import json, os, sys, time
    t0 = time.perf_counter()
    import ray
    from ray.cluster_utils import Cluster
    sys.path.insert(0, sys.argv[1])
    import test_ray_synthesis as T
    from persrep.distributed.synthesis import SynthesisStage
    from persrep.pipeline.context import prepare_run

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        nodes = len([n for n in ray.nodes() if n["Alive"]])
        ctx = prepare_run(T.tiny_settings(sys.argv[2]), run_id="cluster")
        units = T.plan_units(ctx)
        outs = SynthesisStage(ctx, print, max_retries=1, no_progress_timeout_s=120).run(units)
        print("RESULT " + json.dumps({"nodes": nodes, "status": [o.status for o in outs],
                                      "stats": {k: v for k, v in outs.stats.items() if k != "load_ids"},
                                      "seconds": time.perf_counter() - t0}))
    finally:
        ray.shutdown()
        cluster.shutdown()
''')


def test_three_node_cluster_rows_equal_single_node(fresh):
    """Head + two workers (1 CPU each) in a subprocess, so it never shares a driver with ray_local."""
    ctx, units = fresh["ctx"], fresh["units"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-c", CLUSTER_SCRIPT, str(Path(__file__).parent), fresh["root"]],
                          env=env, capture_output=True, text=True, timeout=420, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(lines[-1][len("RESULT "):])
    assert res["nodes"] == 3
    assert res["status"] == ["done"] * len(units)
    assert res["stats"]["actors"] == 3, res  # no GPU: one actor per CPU at 0.5 CPU each
    assert res["stats"]["nodes"] >= 2, res  # actors spread over the nodes (Ray Data's SPREAD default)
    _assert_rows_equal(unit_rows(ctx.storage, units), fresh["baseline"])
