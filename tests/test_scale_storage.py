"""Storage calls per unit on s3:// when a finished job is planned and re-run (no Ray needed).

A real S3 server on loopback (moto, wrapped by ``bench/_s3_counting.py`` to count every request)
holds N published synthesis units and N adapters, published by the real publishers. The re-run
path of the stages that skip finished units (the Ray Data synthesis stage and the Tune stage
return before starting Ray when nothing is left) and the personalisation planner are counted at
N and 2N instances: the calls must grow exactly linearly (a fixed number per unit, whatever the
size of the root) and none may be a LIST: a re-run never lists the root, or a stage, per unit.
The scale simulation (``bench/scale.py``) measures the same at 1,000+ units with the stages running.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from _s3_counting import CountingS3Server, classify  # noqa: E402


@pytest.fixture(scope="module")
def counting_s3():
    srv = CountingS3Server().start()
    with pytest.MonkeyPatch.context() as mp:  # moto accepts any credentials
        for k, v in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                     ("AWS_DEFAULT_REGION", "us-east-1")):
            mp.setenv(k, v)
        import boto3

        boto3.client("s3", endpoint_url=srv.endpoint).create_bucket(Bucket="counted")
        try:
            yield srv
        finally:
            srv.stop()


def test_classify_requests():
    assert classify("GET", "/b/", "list-type=2&prefix=p%2Fsynthesis%2F") == ("LIST", "p/synthesis/")
    assert classify("GET", "/b", "prefix=x") == ("LIST", "x")
    assert classify("GET", "/b/p/adapters/k/MANIFEST.json", "") == ("GET", "p/adapters/k/MANIFEST.json")
    assert classify("HEAD", "/b/p/a", "") == ("HEAD", "p/a")
    assert classify("PUT", "/b/p/a", "") == ("PUT", "p/a")


def _publish_job(srv: CountingS3Server, n: int):
    """A finished job's units on s3: n positives units + 2 negatives units, n adapters."""
    from persrep.config import load_settings
    from persrep.generation import shards
    from persrep.generation.base import SampleRow
    from persrep.pipeline.context import RunContext
    from persrep.pipeline.stages.personalization import plan_personalize_units
    from persrep.pipeline.stages.synthesis import plan_synthesis_units
    from persrep.pipeline.units import ADAPTERS
    from persrep.storage import Storage

    settings = load_settings("local", [f"storage.root=s3://counted/job{n}", f"storage.s3_endpoint={srv.endpoint}",
                                       "generator.types=[cut_paste]", "synthesis.num_positives=3",
                                       "synthesis.num_negatives_per_category=2", "synthesis.filter.enabled=false"])
    storage = Storage.from_settings(settings.storage)
    instances = {f"obj{i:03d}": f"cat{i % 2}" for i in range(n)}
    ctx = RunContext(settings, storage, "sim://", instances, "sim", f"job{n}")
    syn = plan_synthesis_units(ctx, {})
    for u in syn:
        recs = [shards.record(None, SampleRow(**{**r.__dict__}), u.key) for r in u.rows]
        for rec in recs:  # rows without pixels but kept: the verdict counts kept rows
            rec.update(kept=True, error=None)
        shards.publish_unit(storage, u.key, recs, settings.synthesis.rows_per_shard,
                            {"group": u.group, "generator": u.generator, "instance": u.instance, "seconds": 0.0})
    pz = plan_personalize_units(ctx, {u.group: u.key for u in syn})
    for u in pz:
        storage.publish(ADAPTERS, u.key, {"adapter.safetensors": b"\0" * 64}, {"instance": u.instance})
    return ctx, syn, pz


def _rerun_counts(srv: CountingS3Server, n: int) -> dict[str, dict[str, int]]:
    from persrep.distributed.synthesis import SynthesisStage
    from persrep.distributed.tune_stage import PersonalizationStage
    from persrep.pipeline.stages.personalization import plan_personalize_units

    ctx, syn, pz = _publish_job(srv, n)
    out = {}
    srv.counts.reset(prefix=f"job{n}")
    outs = SynthesisStage(ctx).run(syn)
    assert [o.status for o in outs] == ["skipped"] * len(syn)
    out["synthesis"] = srv.counts.snapshot()["ops"]
    srv.counts.reset(prefix=f"job{n}")
    planned = plan_personalize_units(ctx, {u.group: u.key for u in syn})
    assert [u.key for u in planned] == [u.key for u in pz]
    out["plan"] = srv.counts.snapshot()["ops"]
    srv.counts.reset(prefix=f"job{n}")
    outs = PersonalizationStage(ctx).run(pz)
    assert [o.status for o in outs] == ["skipped"] * len(pz)
    out["personalization"] = srv.counts.snapshot()["ops"]
    out["units"] = {"synthesis": len(syn), "plan": len(pz), "personalization": len(pz)}
    return out


def test_rerun_storage_calls_per_unit_are_constant_and_never_list(counting_s3):
    small, large = _rerun_counts(counting_s3, 4), _rerun_counts(counting_s3, 8)
    for phase in ("synthesis", "plan", "personalization"):
        assert small[phase], phase  # counted at all
        assert "LIST" not in small[phase] and "LIST" not in large[phase], (phase, small[phase], large[phase])
        assert not {"PUT", "POST", "DELETE"} & set(small[phase]), (phase, small[phase])  # a re-run writes nothing
    assert large["units"]["personalization"] == 2 * small["units"]["personalization"] == 8
    for phase in ("synthesis", "plan", "personalization"):
        per_small = {op: c / small["units"][phase] for op, c in small[phase].items()}
        per_large = {op: c / large["units"][phase] for op, c in large[phase].items()}
        assert per_small == per_large, (phase, small[phase], large[phase])
        # a HEAD + a GET of the manifest and a HEAD per file (its size and time): a handful per unit
        assert sum(per_small.values()) <= 6, (phase, per_small)
        # the skip check reads no unit data: the only GETs are manifests (one per unit at most)
        assert per_small.get("GET", 0) <= 1, (phase, per_small)


def test_tune_experiment_state_per_trial_does_not_grow_with_trials():
    """What Tune pickles into every trial's entry of the experiment state (the trial namers)
    and what forces snapshots (checkpoint retention) do not depend on the number of trials."""
    import pickle

    from persrep.config import load_settings
    from persrep.distributed.tune_stage import _STATES, _StageState, _TrialNamer, trial_checkpoint_config

    class Trial:
        def __init__(self, key):
            self.config = {"unit": key}

    sizes = []
    for n in (10, 1000):
        token = f"exp-{n:05d}"
        _STATES[token] = _StageState({f"k{i}": f"cut_paste:vit:obj{i:05d}" for i in range(n)}, print, [])
        try:
            namer, dirs = _TrialNamer(token), _TrialNamer(token, dirs=True)
            assert namer(Trial("k3")) == "cut_paste:vit:obj00003"
            assert dirs(Trial("k3")).startswith("cut_paste_vit_obj00003-")
            sizes.append(len(pickle.dumps(namer)) + len(pickle.dumps(dirs)))
        finally:
            _STATES.pop(token)
    assert sizes[0] == sizes[1] < 400, sizes
    assert _TrialNamer("gone")(Trial("k9")) == "k9"  # a restored experiment without this driver's state
    # no forced experiment snapshot per trial by default; a retention limit is a setting
    assert trial_checkpoint_config(load_settings("local", [])).num_to_keep is None
    assert trial_checkpoint_config(load_settings("local", ["resources.tune_checkpoints_to_keep=2"])).num_to_keep == 2


def test_fractional_gpus_per_tune_trial():
    """Several ViT-B trials per GPU in the paper config, without shrinking other stages' GPUs."""
    from persrep.config import load_settings
    from persrep.distributed.tune_stage import trial_resources
    from persrep.pipeline.resource_plan import ResourcePlan

    s = load_settings("local", ["resources.gpus_per_tune_trial=0.25", "resources.cpus_per_trial=0.5"])
    assert trial_resources(s, gpus_in_cluster=2) == {"cpu": 0.5, "gpu": 0.25}
    assert trial_resources(s, gpus_in_cluster=0) == {"cpu": 0.5}  # CPU-only cluster: no GPU asked
    paper = load_settings("paper", [])
    assert trial_resources(paper, gpus_in_cluster=8)["gpu"] == 0.25
    assert ResourcePlan.unplanned(paper).unit("generator_prep").gpus == 1.0  # DreamBooth keeps a whole GPU


def test_synthesis_cold_start_itemised_from_actor_clocks():
    """The stage's cold start, per actor, in seconds after the pass began (bench/synthesis.json)."""
    from persrep.config import load_settings
    from persrep.distributed.synthesis import cold_start_clock, cold_start_summary, needs_diffusion

    clock = cold_start_clock(100.0, diffusion=False)
    assert clock["init_start"] == 100.0 and clock["imports_s"] >= 0 and clock["pid"] > 0
    clocks = [{"process_start": 99.0, "init_start": 100.0, "imports_s": 3.0, "init_done": 104.0,
               "first_load_s": 2.5, "first_batch_done": 108.0},
              {"init_start": 101.0, "imports_s": 2.0, "init_done": 103.5, "first_batch_done": 107.0}]
    s = cold_start_summary(clocks, t_pass_wall=98.0)
    assert s["actors"] == 2 and s["process_started_s"] == [1.0]
    assert s["constructor_entered_s"] == [2.0, 3.0] and s["actor_ready_s"] == [6.0, 5.5]
    assert s["first_generator_load_s"] == [2.5, None] and s["first_batch_done_s"] == [10.0, 9.0]
    assert cold_start_summary([], 0.0) == {}
    assert needs_diffusion(load_settings("local", []))  # DreamBooth in the demo
    assert not needs_diffusion(load_settings("local", ["generator.types=[cut_paste]",
                                                       "generator.cut_paste.backgrounds=photos"]))
