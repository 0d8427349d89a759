"""``synthesis.caption_sources: [llm]`` in the pipeline: captions generated once per category as
keyed units before synthesis (a real tiny model), used by positives and (identifier removed)
negatives, skipped on a re-run, and a failed category leaves its rows unplanned and is named."""

from __future__ import annotations

import pytest

from persrep.config import ConfigError, load_settings
from persrep.generation import shards
from persrep.pipeline.context import prepare_run
from persrep.pipeline.executor import LocalExecutor
from persrep.pipeline.results import RunSummary
from persrep.pipeline.sequence import run_data_stages
from persrep.pipeline.stages.captions import STAGE, caption_key, llm_captions, plan_caption_units
from persrep.pipeline.stages.synthesis import plan_synthesis_units
from tiny_lm import CHAIN, WORDS, chain_lm

TINY = ["data.toy.categories=2", "data.toy.instances_per_category=2", "data.toy.image_size=64",
        "data.toy.test_per_scene=1", "data.toy.negatives_per_category=2", "data.toy.dense_per_instance=0",
        "synthesis.num_positives=3", "synthesis.num_negatives_per_category=3",
        "synthesis.inference_steps=2", "synthesis.resolution=32", "tracking.enabled=false",
        "synthesis.caption_sources=[llm]", "synthesis.captions.per_category=2",
        "synthesis.captions.batch_size=4", "synthesis.captions.max_rounds=3"]


@pytest.fixture(scope="module")
def chain_dir(tmp_path_factory):
    return chain_lm(tmp_path_factory.mktemp("chain") / "model", WORDS, CHAIN)


def _ctx(root, model, *extra):
    s = load_settings("local", [*TINY, f"storage.root={root}", f"synthesis.captions.model={model}", *extra])
    return prepare_run(s, run_id="t")


def test_llm_needs_a_model():
    with pytest.raises(ConfigError, match="contains 'llm' but neither synthesis.captions.model"):
        load_settings("local", ["synthesis.caption_sources=[llm]"])


def test_captions_stage_feeds_negatives_and_is_reused(tmp_path, chain_dir):
    ctx = _ctx(tmp_path / "runs", chain_dir, "generator.types=[real_only]", "personalization.negatives=generated")
    units = plan_caption_units(ctx)
    assert [u.category for u in units] == ["bottle", "mug"]
    summary = RunSummary("t")
    out = run_data_stages(ctx, LocalExecutor(0), summary, lambda m: None)
    assert summary.stages["captions"]["done"] == 2 and not summary.failures
    caps = llm_captions(ctx)
    assert set(caps) == {"bottle", "mug"} and all(len(v) == 2 for v in caps.values())
    neg_groups = sorted(g for g in out.synthesized if g.startswith("neg:"))
    assert neg_groups == ["neg:5:llm:bottle", "neg:5:llm:mug"]
    table = shards.read_unit(ctx.storage, out.synthesized["neg:5:llm:mug"], kept_only=False)
    prompts = set(table.column("prompt").to_pylist())
    assert prompts <= {"A mug sits on wooden desk beside laptop in morning light",
                       "A mug sits on wooden desk beside laptop in evening light"}, prompts
    assert set(table.column("caption_source").to_pylist()) == {"llm"}
    # a re-run: the captions units are published, nothing regenerated, the same synthesis keys
    again = RunSummary("t2")
    out2 = run_data_stages(_ctx(tmp_path / "runs", chain_dir, "generator.types=[real_only]",
                                "personalization.negatives=generated"), LocalExecutor(0), again, lambda m: None)
    assert again.stages["captions"]["skipped"] == 2 and again.stages["captions"]["done"] == 0
    assert out2.synthesized == out.synthesized


def test_positive_rows_use_category_captions_and_keys_follow_settings(tmp_path, chain_dir):
    ctx = _ctx(tmp_path / "runs", chain_dir, "generator.types=[dreambooth]", "personalization.negatives=generated")
    from persrep.pipeline.stages.captions import run_caption_unit

    for u in plan_caption_units(ctx):
        run_caption_unit(ctx, u)
    ready = {("dreambooth", n): "gen-key" for n in ctx.instances}  # planning only: no training
    units = {u.group: u for u in plan_synthesis_units(ctx, ready)}
    pos = [u for g, u in units.items() if g.startswith("pos:")]
    assert len(pos) == len(ctx.instances)
    for u in pos:
        assert {r.caption_source for r in u.rows} == {"llm"}
        assert all(r.prompt.startswith("A <new1> mug sits on wooden desk") for r in u.rows)
    # the key hashes what changes the captions, not the bound on attempts
    s = ctx.settings
    k = caption_key(s, "mug")
    assert caption_key(s.model_copy(update={"synthesis": s.synthesis.model_copy(
        update={"captions": s.synthesis.captions.model_copy(update={"max_rounds": 99})})}), "mug") == k
    assert caption_key(s.model_copy(update={"synthesis": s.synthesis.model_copy(
        update={"captions": s.synthesis.captions.model_copy(update={"seed": 1})})}), "mug") != k


def test_failed_category_is_named_and_its_rows_left_out(tmp_path, chain_dir):
    # only two distinct captions exist: asking for 3 fails within the bound
    ctx = _ctx(tmp_path / "runs", chain_dir, "generator.types=[real_only]",
               "personalization.negatives=generated", "synthesis.captions.per_category=3",
               "synthesis.captions.max_rounds=1")
    summary = RunSummary("t")
    out = run_data_stages(ctx, LocalExecutor(0), summary, lambda m: None)
    assert summary.stages["captions"]["failed"] == 2
    assert all("2 of 3 valid after 1 rounds" in f["error"] for f in summary.failures), summary.failures
    assert not out.synthesized and not any(ctx.storage.is_finished(STAGE, u.key) for u in plan_caption_units(ctx))


@pytest.mark.ray
@pytest.mark.slow
def test_caption_units_run_as_ray_tasks_like_any_unit(tmp_path, chain_dir, ray_local):
    """On Ray (the session's local cluster) the captions stage is Ray tasks through the executor;
    the published captions equal the in-process ones (same key, same seeded text)."""
    from persrep.captions.generate import generate_captions
    from persrep.distributed.ray_executor import RayExecutor
    from persrep.pipeline.stages.captions import CAPTIONS_FILE

    ctx = _ctx(tmp_path / "runs", chain_dir, "generator.types=[real_only]",
               "personalization.negatives=in_pool", "resources.gpus_per_trial=0")
    summary = RunSummary("ray")
    run_data_stages(ctx, RayExecutor(0, lambda m: None), summary, lambda m: None)
    assert summary.stages["captions"] == {"done": 2, "skipped": 0, "failed": 0, "retried": 0}
    local = generate_captions(["bottle", "mug"], ctx.settings.synthesis.captions)
    for u in plan_caption_units(ctx):
        import json

        published = json.loads(ctx.storage.read_unit_file(STAGE, u.key, CAPTIONS_FILE))
        assert published == {u.category: local[u.category]}


def test_sweep_plans_llm_options_after_generating_their_captions(tmp_path, chain_dir):
    """A sweep over caption sources: resolve_data (which plans synthesis keys before any executor
    exists) generates the captions first, so the llm option has its own, stable synthesis keys."""
    import yaml

    from persrep.sweep.data import resolve_data
    from persrep.sweep.space import load_space

    ctx = _ctx(tmp_path / "runs", chain_dir, "generator.types=[dreambooth]", "personalization.negatives=generated")
    doc = {"config": "local", "overrides": {
        "data.path": ctx.data_path, "data.max_instances": None, "synthesis.num_positives": 2,
        "synthesis.num_negatives_per_category": 2, "synthesis.captions.model": str(chain_dir),
        "synthesis.captions.per_category": 2, "synthesis.captions.batch_size": 4,
        "personalization.negatives": "generated", "generator.types": ["dreambooth"]},
        "metric": "retrieval.ndcg", "mode": "max", "search": "grid",
        "space": {"synthesis.caption_sources": {"grid": ["template", "llm"]}}}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(doc))
    space = load_space(str(tmp_path / "space.yaml"), [f"storage.root={ctx.storage.root}"])
    options = resolve_data(space, ctx)
    assert [o.label for o in options] == ["dreambooth/cfg5/template", "dreambooth/cfg5/llm"]
    llm = options[1]
    assert sorted(g.split(":")[0] + ":" + g.split(":")[-1] for g in llm.synthesis_keys) == [
        "neg:bottle", "neg:mug", "pos:bottle_0", "pos:bottle_1", "pos:mug_0", "pos:mug_1"]
    assert all(ctx.storage.is_finished(STAGE, u.key) for u in plan_caption_units(
        replace_settings(ctx, space.settings_for({"synthesis.caption_sources": "llm"}))))
    assert [o.synthesis_keys for o in resolve_data(space, ctx)] == [o.synthesis_keys for o in options]


def replace_settings(ctx, settings):
    from dataclasses import replace

    return replace(ctx, settings=settings)


def test_relative_model_dir_is_resolved_on_the_driver(tmp_path, chain_dir, monkeypatch):
    """A relative synthesis.captions.model is made absolute when planned, so a worker that starts
    in another directory loads the same model."""
    import os
    import shutil

    from persrep.pipeline.stages.captions import run_caption_unit

    shutil.copytree(chain_dir, tmp_path / "models" / "chain")
    monkeypatch.chdir(tmp_path)
    ctx = _ctx(tmp_path / "runs", "models/chain", "generator.types=[real_only]", "personalization.negatives=in_pool")
    units = plan_caption_units(ctx)
    assert all(u.model == str(tmp_path / "models" / "chain") for u in units)
    os.chdir(tmp_path / "runs")  # a worker elsewhere
    assert run_caption_unit(ctx, units[0])["status"] == "done"
