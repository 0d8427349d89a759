"""Masks inside a run: `generator.auto_masks` as keyed units, the error that names `persrep data
masks`, pre-flight of the segmenters, and PerSAM filtering of synthesised images (shard rows)."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from PIL import Image

from persrep.config import load_settings
from persrep.data.layout import DatasetError
from persrep.generation import shards
from persrep.pipeline import run_pipeline
from persrep.pipeline.context import prepare_run
from persrep.segmentation import SegmenterUnavailableError

TINY = ["data.toy.categories=2", "data.toy.instances_per_category=1", "data.toy.image_size=64",
        "data.toy.test_per_scene=1", "data.toy.dense_per_instance=0", "data.toy.negatives_per_category=4",
        "generator.types=[cut_paste]", "synthesis.num_positives=3", "synthesis.resolution=64",
        "generator.cut_paste.backgrounds=@data/backgrounds", "personalization.negatives=external",
        "personalization.external_negatives=@data/negatives",
        "personalization.max_steps=2", "personalization.batch_size=4",
        "personalization.backbones=[{name: tf_efficientnet_lite0, weights: offline, image_size: 64}]",
        "evaluation.tasks=[classification, retrieval]", "tracking.enabled=false",
        "segmentation.init=box"]


@pytest.fixture(scope="module")
def maskless_toy(tmp_path_factory):
    """The toy world (tiny) with its train masks removed: 3 plain photos per instance."""
    from persrep.data.toy import write_toy_dataset

    root = tmp_path_factory.mktemp("toy") / "plain"
    write_toy_dataset(root, categories=2, instances_per_category=1, image_size=64, test_per_scene=1,
                      dense_per_instance=0, negatives_per_category=4)
    shutil.rmtree(root / "train_masks")
    if not (root / "backgrounds").exists():  # cut-and-paste backgrounds: the toy's negatives photos
        shutil.copytree(next(p for p in (root / "negatives").iterdir() if p.is_dir()), root / "backgrounds")
    return root


def _settings(root, data, *extra):
    return load_settings("local", [*TINY, f"data.path={data}", f"storage.root={root}", *extra])


@pytest.mark.slow
def test_a_run_without_masks_names_the_command_and_auto_masks_runs_as_keyed_units(tmp_path, maskless_toy):
    with pytest.raises(DatasetError, match=r"persrep data masks .*generator.auto_masks=true"):
        prepare_run(_settings(tmp_path / "r0", maskless_toy))
    with pytest.raises(SegmenterUnavailableError, match="segmentation.model is not set"):
        prepare_run(_settings(tmp_path / "r0", maskless_toy, "generator.auto_masks=true",
                              "segmentation.segmenter=sam"))
    with pytest.raises(DatasetError, match="persam needs reference masks"):
        prepare_run(_settings(tmp_path / "r0", maskless_toy, "generator.auto_masks=true",
                              "segmentation.segmenter=persam", "segmentation.model=tiny"))

    root = tmp_path / "root"
    s = _settings(root, maskless_toy, "generator.auto_masks=true")
    summary = run_pipeline(s, run_id="first")
    assert summary.exit_code == 0, summary.failures
    assert summary.stages["auto_masks"]["done"] == 2  # one unit per instance, before generator prep
    assert any(n.startswith("auto masks: segmenter grabcut") for n in summary.notes)  # labelled in the run
    assert summary.stages["synthesis"]["done"] >= 2  # cut-and-paste from the predicted masks
    assert summary.stages["personalization"]["done"] == 2  # cut-and-paste, 2 instances
    units = sorted((root / "masks").iterdir())
    assert len(units) == 2 and all((u / "MANIFEST.json").is_file() for u in units)
    # the cut-and-paste positives carry the predicted mask's object: every pasted mask is non-empty
    syn = [k.name for k in (root / "synthesis").iterdir()]
    from persrep.storage import Storage
    st = Storage(str(root))
    masks = [m for k in syn for m in shards.read_unit(st, k).column("mask").to_pylist() if m]
    assert masks and all(np.asarray(Image.open(io.BytesIO(m))).any() for m in masks)
    # a re-run skips every unit; a different segmenter setting is a different unit key
    again = run_pipeline(s, run_id="second")
    assert again.stages.get("auto_masks", {"done": 0})["done"] == 0
    assert all(c["done"] == 0 for c in again.stages.values()), again.stages
    from persrep.pipeline.stages.auto_masks import plan_mask_units

    ctx1 = prepare_run(s)
    ctx2 = prepare_run(_settings(root, maskless_toy, "generator.auto_masks=true", "segmentation.margin=0.1"))
    k1, k2 = plan_mask_units(ctx1), plan_mask_units(ctx2)
    assert {u.key for u in k1} == {u.name for u in units}
    assert not {u.key for u in k1} & {u.key for u in k2}


def test_persam_filter_records_the_predicted_mask_and_score_on_each_row(tmp_path, maskless_toy):
    """Filtering the paper's way with a tiny random-weight SAM: the plumbing, not the quality."""
    from persrep.config import SegmentationSettings
    from persrep.generation.filtering import make_scorer
    from persrep.pipeline.instance_data import instance_data
    from persrep.pipeline.stages.synthesis import plan_synthesis_units, run_synthesis_unit
    from persrep.segmentation import Reference, get_segmenter

    root = tmp_path / "root"
    s = _settings(root, maskless_toy, "generator.auto_masks=true", "synthesis.filter.enabled=true",
                  "synthesis.filter.scorer=embedding", "synthesis.filter.threshold=-1",
                  "synthesis.filter.segmenter=persam", "segmentation.model=tiny")
    ctx = prepare_run(s)
    assert any("filter: segmenter persam" in n for n in ctx.notes)
    unit = next(u for u in plan_synthesis_units(ctx, {}) if u.generator == "cut_paste")
    out = run_synthesis_unit(ctx, unit)
    assert out["status"] == "done" and out["errors"] == 0
    table = shards.read_unit(ctx.storage, unit.key, kept_only=False).to_pylist()
    assert len(table) == 3 and all(r["filter_score"] is not None and r["mask"] for r in table)
    # the recorded mask is PerSAM's prediction for the stored image (reference: the auto masks)
    inst = instance_data(ctx, unit.instance)
    seg = get_segmenter("persam", SegmentationSettings(model="tiny", init="box"))
    ref = Reference(inst.train_images, inst.train_masks)
    for r in table:
        img = Image.open(io.BytesIO(r["image"])).convert("RGB")
        predicted = seg.segment([img], ref)[0].mask
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(r["mask"]))) > 0, predicted)
        # and the score is the embedding scorer on the mask-box crops
        want = make_scorer("embedding", inst).score([img], [Image.fromarray(predicted.astype(np.uint8) * 255)])[0]
        assert r["filter_score"] == pytest.approx(want, abs=1e-4)


@pytest.mark.slow
def test_context_negatives_train_from_the_predicted_masks_and_key_on_their_segmenter(tmp_path, maskless_toy):
    """`personalization.hard_negatives.context` reads the train masks (predicted here): the adapter
    counts the context negatives it trained with, and a different segmenter setting is a
    different adapter even where the positives do not depend on the masks (real-only)."""
    import json

    from persrep.pipeline.stages.personalization import plan_personalize_units

    with pytest.raises(DatasetError, match=r"hard_negatives.context=16 .*no train masks: set generator.auto_masks=true"):
        prepare_run(_settings(tmp_path / "r0", maskless_toy, "generator.types=[real_only]",
                              "personalization.hard_negatives.context=16"))
    real = ["generator.auto_masks=true", "generator.types=[real_only]"]
    s = _settings(tmp_path / "root", maskless_toy, *real, "personalization.hard_negatives.context=16")
    summary = run_pipeline(s, run_id="ctx")
    assert summary.exit_code == 0, summary.failures
    metrics = [json.loads(p.read_text())["metrics"] for p in (tmp_path / "root" / "adapters").glob("*/metrics.json")]
    # the toy objects fill much of their 64-px photos: a few crops find room beside them (2 and 5)
    assert len(metrics) == 2 and all(0 < m["num_context_negatives"] <= 16 for m in metrics), metrics
    assert all(m["num_recoloured_negatives"] == 0 for m in metrics)

    def keys(*extra):
        return {u.key for u in plan_personalize_units(prepare_run(_settings(tmp_path / "k", maskless_toy, *extra)), {})}

    margin = "segmentation.margin=0.1"
    assert keys(*real) == keys(*real, margin)  # no context negatives: the masks do not matter
    ctx_on = [*real, "personalization.hard_negatives.context=16"]
    assert keys(*ctx_on) != keys(*ctx_on, margin) and not keys(*ctx_on) & keys(*real)
