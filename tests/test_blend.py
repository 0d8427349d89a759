"""evaluation.pretrained_share: a personalised global feature blended with the pretrained one.

Oracles: the cosine identity checked in float64 by hand; at share 1 the personalised rows must
equal the pretrained rows (classification, retrieval); the prefix-cache path must equal the full
forward; unit keys stay put at share 0."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from persrep.config import BackboneSettings, LoraSettings, load_settings
from persrep.keys import result_settings
from persrep.models.blend import BlendedExtractor, blend, blend_arrays


def test_blended_cosine_is_the_share_weighted_mix_of_the_two_cosines():
    rng = np.random.default_rng(0)
    a, p = rng.normal(size=(6, 5)), rng.normal(size=(6, 7)) * 3.0  # unnormalised, other widths
    an = a / np.linalg.norm(a, axis=1, keepdims=True)
    pn = p / np.linalg.norm(p, axis=1, keepdims=True)
    for share in (0.0, 0.3, 0.5, 1.0):
        f = blend_arrays(a.astype(np.float32), p.astype(np.float32), share).astype(np.float64)
        assert np.allclose(np.linalg.norm(f, axis=1), 1.0, atol=1e-6)
        want = (1 - share) * (an @ an.T) + share * (pn @ pn.T)
        assert np.allclose(f @ f.T, want, atol=1e-5), share
    assert blend_arrays(a.astype(np.float32), p.astype(np.float32), 0.0).shape == (6, 5)  # nothing appended
    with pytest.raises(ValueError, match="pretrained share"):
        blend(torch.zeros(2, 3), torch.zeros(2, 3), 1.5)
    with pytest.raises(ValueError, match="2 adapted features for 3"):
        blend(torch.ones(2, 3), torch.ones(3, 3), 0.5)


def test_the_setting_is_checked_and_leaves_keys_alone_at_zero():
    s = load_settings("local")
    assert "pretrained_share" not in result_settings(s.evaluation, "evaluation")
    on = load_settings("local", ["evaluation.pretrained_share=0.5"])
    assert result_settings(on.evaluation, "evaluation")["pretrained_share"] == 0.5
    with pytest.raises(Exception, match="pretrained_share"):
        load_settings("local", ["evaluation.pretrained_share=2"])


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A tiny data set, one trained-looking adapter (random LoRA weights) for its first instance."""
    from persrep.models.backbones import build_backbone
    from persrep.models.lora import apply_lora, lora_parameters, save_adapter
    from persrep.pipeline.context import prepare_run

    tmp = tmp_path_factory.mktemp("blend")
    small = ["data.toy.categories=2", "data.toy.instances_per_category=2", "data.toy.image_size=48",
             "data.toy.test_per_scene=2", "data.toy.dense_per_instance=0", "tracking.enabled=false",
             f"storage.root={tmp}", "evaluation.tasks=[classification,retrieval]"]
    ctx = prepare_run(load_settings("local", small))
    bs = BackboneSettings(name="tf_efficientnet_lite0", weights="offline", image_size=64)
    torch.manual_seed(0)
    trained = apply_lora(build_backbone(bs), LoraSettings(rank=4))
    with torch.no_grad():
        for prm in lora_parameters(trained):
            prm.add_(0.2 * torch.randn_like(prm))
    path = save_adapter(trained, tmp / "a.safetensors")
    return ctx, bs, path, small


def test_blended_rows_name_the_model_used(toy):
    from persrep.evaluation.stage import Evaluator

    ctx, bs, path, _ = toy
    inst = sorted(ctx.instances)[0]
    for share, want in ((0.25, {"adapter + pretrained (share 0.25)"}), (0.0, {None})):
        ev = ctx.settings.evaluation.model_copy(update={"pretrained_share": share})
        rows = Evaluator(ctx.dataset, ev).evaluate_adapter(bs, inst, path, {"adapter_key": f"k{share}"})
        assert {r.get("model_used") for r in rows} == want


def _headline(rows, model=None):
    return {(r["instance"], r["task"], r["metric"]): r["value"] for r in rows
            if r["scene"] == "all" and r["metric"] in ("ap", "ndcg")}


def _evaluate(ctx, bs, path, share, prefix_cache=True):
    from persrep.evaluation.stage import Evaluator

    ev = ctx.settings.evaluation.model_copy(update={"pretrained_share": share, "prefix_cache": prefix_cache})
    inst = sorted(ctx.instances)[0]
    e = Evaluator(ctx.dataset, ev)
    return _headline(e.evaluate_adapter(bs, inst, path, {"adapter_key": f"a-{share}-{prefix_cache}"})), \
        _headline(e.evaluate_pretrained(bs, [inst], {}))


def test_share_one_scores_as_the_pretrained_model_and_a_half_lies_between(toy):
    ctx, bs, path, _ = toy
    full, pre = _evaluate(ctx, bs, path, 1.0)
    assert full == pytest.approx(pre, abs=1e-9)
    alone, _ = _evaluate(ctx, bs, path, 0.0)
    assert alone != pytest.approx(pre, abs=1e-6)  # the adapter changes the scores at all
    half, _ = _evaluate(ctx, bs, path, 0.5)
    half_full_forward, _ = _evaluate(ctx, bs, path, 0.5, prefix_cache=False)
    assert half == pytest.approx(half_full_forward, abs=1e-6)  # the tail-only path blends the same


def test_share_enters_the_adapter_evaluation_key_only(toy, tmp_path):
    from persrep.pipeline.stages.evaluation import pretrained_eval_units

    ctx, _, _, small = toy
    shared = replace(ctx, settings=load_settings("local", [*small, "evaluation.pretrained_share=0.5"]))
    assert [u.key for u in pretrained_eval_units(ctx)] == [u.key for u in pretrained_eval_units(shared)]


def test_blended_extractor_keeps_the_adapters_dense_features():
    class Fixed:
        def __init__(self, g, d):
            self.g, self.d = g, d

        def global_features(self, x):
            return self.g

        def dense_features(self, x):
            return self.d

    a, p = Fixed(torch.ones(2, 3), torch.zeros(2, 4, 2, 2)), Fixed(torch.eye(2, 3), torch.ones(2, 4, 2, 2))
    ex = BlendedExtractor(a, p, 0.25)
    assert ex.global_features(None).shape == (2, 6)
    assert torch.equal(ex.dense_features(None), a.d)
