"""The frozen-prefix path of evaluation gives the features and metrics of the full forward.

Oracle: the same model's plain forward (``Backbone.global_features`` / ``dense_features``). The
cached path runs the same layers in the same order on the same batches, so we expect equality;
the assertions allow float rounding (embeddings: atol 1e-5; metrics: 1e-6) in case a kernel
picks a different blocking for a different batch shape, and report whether they were bit-identical.
"""

import numpy as np
import pytest
import torch

from persrep.config import BackboneSettings, EvaluationSettings, LoraSettings
from persrep.data.layout import open_dataset
from persrep.data.toy import write_toy_dataset
from persrep.evaluation import prefix_pool
from persrep.evaluation.stage import Evaluator
from persrep.models.backbones import build_backbone
from persrep.models.lora import apply_lora, save_adapter
from persrep.models.prefix import (global_from_map, hypercolumn, hypercolumn_block, prefix_split,
                                   run_prefix, run_tail)

BS = BackboneSettings(name="tf_efficientnet_lite0", weights="tiny", image_size=64)


def _adapted(seed: int = 0, targets=None):
    """A LoRA backbone whose adapter really changes the features (lora_B non-zero)."""
    b = apply_lora(build_backbone(BS), LoraSettings(target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    for name, p in b.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.1
    return b.eval()


def test_prefix_split_is_the_first_adapted_block():
    b = _adapted()
    assert prefix_split(b) == 5  # default targets: blocks.5, blocks.6, conv_head
    assert hypercolumn_block(b) == 4
    assert prefix_split(b, ["blocks.3.0.conv_pw", "conv_head"]) == 3
    assert prefix_split(b, ["conv_stem"]) is None  # an adapted stem: nothing is shared
    assert prefix_split(build_backbone(BS)) is None  # no adapter, no targets given
    vit = build_backbone(BackboneSettings(name="vit_small_patch14_dinov2.lvd142m", weights="tiny"))
    assert prefix_split(vit, ["blocks.1.attn.qkv"]) is None  # token models: full forward


def test_tail_on_prefix_equals_the_full_forward():
    b = _adapted()
    x = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        h = run_prefix(b, x, 5)
        fmap, mid = run_tail(b, h, 5, keep=4)
        for feature in ("cls", "cls+mean"):
            torch.testing.assert_close(global_from_map(fmap, feature), b.global_features(x, feature),
                                       rtol=0, atol=1e-5)
        torch.testing.assert_close(hypercolumn(mid, fmap), b.dense_features(x, "hypercolumn"),
                                   rtol=0, atol=1e-5)
        torch.testing.assert_close(fmap, b.dense_features(x, "last"), rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    path = write_toy_dataset(root / "ds", categories=2, instances_per_category=2, image_size=64,
                             test_per_scene=2, dense_per_instance=2, negatives_per_category=2)
    adapter = save_adapter(_adapted(3), root / "adapter.safetensors")
    return open_dataset(str(path)), adapter


@pytest.mark.parametrize("dense", ["hypercolumn", "last"])
def test_evaluation_with_prefix_cache_matches_full_forward(toy, dense):
    ds, adapter = toy
    ev = EvaluationSettings(dense_input_size=64, batch_size=5, dense_features=dense)  # batches split the pools
    results = {}
    for cached in (False, True):
        prefix_pool.clear_process_cache()
        e = Evaluator(ds, ev.model_copy(update={"prefix_cache": cached}))
        rows = e.evaluate_pretrained(BS, ds.names, {"model": "pretrained"})
        rows += e.evaluate_adapter(BS, ds.names[0], adapter, {"model": "personalised"})
        results[cached] = {(r["model"], r["instance"], r["task"], r["metric"], r["scene"]): r["value"]
                           for r in rows}
        if cached:  # the tail-only path was really taken, and the pools' prefixes were computed once
            assert e._prefix is not None and e._prefix[1] == 5
            assert len(prefix_pool.process_cache(ev.batch_size)._memory) == 4  # 2 pools x (global, dense)
    plain, cached = results[False], results[True]
    assert plain.keys() == cached.keys() and len(plain) > 50
    assert {k[2] for k in plain} == {"classification", "retrieval", "detection", "segmentation"}
    diffs = [abs(plain[k] - cached[k]) for k in plain if not (np.isnan(plain[k]) and np.isnan(cached[k]))]
    assert max(diffs) <= 1e-6, f"max |diff| {max(diffs)}"
    # the personalised rows differ from the pretrained ones: the adapter is not a no-op
    pers = {k[2:]: v for k, v in cached.items() if k[0] == "personalised"}
    pre = {k[2:]: v for k, v in cached.items() if k[0] == "pretrained" and k[1] == ds.names[0]}
    assert any(abs(pers[k] - pre[k]) > 1e-6 for k in pers if k in pre)


def test_global_embeddings_of_the_cached_path_equal_the_full_forward(toy):
    ds, adapter = toy
    from persrep.evaluation.stage import LazyImages
    from persrep.evaluation.features import WithGlobalFeature
    from persrep.models.backbones import eval_transform
    from persrep.models.lora import load_adapter

    b = load_adapter(build_backbone(BS), adapter)
    images = LazyImages(ds, Evaluator(ds, EvaluationSettings()).pools.test, eval_transform(BS))
    prefix_pool.clear_process_cache()
    acts = prefix_pool.prefix_activations(b, 5, images, "test-list", "t", batch_size=4)
    tail = prefix_pool.TailExtractor(b, 5, "cls+mean", "hypercolumn")
    plain = WithGlobalFeature(b, "cls+mean")
    with torch.inference_mode():
        for start in range(0, len(images), 4):
            idx = range(start, min(start + 4, len(images)))
            x = torch.stack([images[i] for i in idx])
            h = torch.stack([acts[i] for i in idx])
            torch.testing.assert_close(tail.global_features(h), plain.global_features(x), rtol=0, atol=1e-5)


def test_global_input_size_embeds_at_that_size_and_keys_it(toy):
    """evaluation.global_input_size: the global pools are the plain forward of the centre crop at
    that size (not the backbone's image_size), the metrics change, and the setting enters the unit
    key only when set (runs stored before it keep their keys)."""
    from persrep.evaluation.features import WithGlobalFeature
    from persrep.evaluation.stage import LazyImages
    from persrep.keys import result_settings
    from persrep.models.backbones import eval_transform

    ds, _ = toy
    ev = EvaluationSettings(tasks=["classification", "retrieval"], batch_size=5)
    big = ev.model_copy(update={"global_input_size": 96})
    base = build_backbone(BS).eval()
    e = Evaluator(ds, big)
    pool = e._global_pool(WithGlobalFeature(base, big.global_feature), "t", BS)
    images = LazyImages(ds, e.pools.test, eval_transform(BS, size=96))
    with torch.inference_mode():
        want = base.global_features(torch.stack([images[i] for i in range(len(images))]), big.global_feature)
    assert images[0].shape[-1] == 96
    np.testing.assert_allclose(pool.test_embeddings, want.numpy(), atol=1e-5)
    rows = {(r["instance"], r["task"], r["metric"], r["scene"]): r["value"]
            for r in Evaluator(ds, ev).evaluate_pretrained(BS, ds.names, {})}
    rows_big = {(r["instance"], r["task"], r["metric"], r["scene"]): r["value"]
                for r in Evaluator(ds, big).evaluate_pretrained(BS, ds.names, {})}
    assert rows.keys() == rows_big.keys() and any(abs(rows[k] - rows_big[k]) > 1e-6 for k in rows)
    assert "global_input_size" not in result_settings(ev, "evaluation")
    assert result_settings(big, "evaluation")["global_input_size"] == 96
