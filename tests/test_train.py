"""train_one_instance: plain PyTorch, no Ray; loss falls, resume == uninterrupted, batch size 1."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from persrep.config import BackboneSettings, PersonalizationSettings
from persrep.contrastive.train import (TrainingData, batch_indices, personalised_backbone,
                                       total_steps, train_one_instance)

TINY = BackboneSettings(name="vit_tiny_patch16_224", weights="tiny", image_size=32)


def _obj(seed, color):
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (48, 48), tuple(int(c) for c in rng.integers(150, 255, 3)))
    d = ImageDraw.Draw(img)
    x, y = rng.integers(4, 16, 2)
    d.ellipse([x, y, x + 24, y + 24], fill=color)
    return img


def _data():
    anchors = [_obj(i, (200, 20, 20)) for i in range(3)]
    positives = [_obj(10 + i, (200, 20, 20)) for i in range(8)]
    negatives = [_obj(20 + i, (20, 20, 200)) for i in range(8)]
    return TrainingData("red", anchors, positives, negatives)


def _pz(**kw):
    base = dict(learning_rate=1e-3, batch_size=4, num_triplets=64, num_positives=8, epochs=1,
                checkpoint_every=3, seed=3)
    base.update(kw)
    return PersonalizationSettings(**base)


def test_schedule_helpers():
    pz = _pz(num_triplets=10, batch_size=4, epochs=2)
    assert total_steps(pz) == 6
    assert total_steps(_pz(max_steps=2)) == 2
    seen = np.concatenate([batch_indices(pz, s) for s in range(3)])
    assert sorted(seen) == list(range(10))  # one epoch covers every triplet once


def test_loss_falls_and_adapter_reloads(tmp_path):
    pz = _pz(max_steps=12)
    res = train_one_instance(pz, TINY, _data(), tmp_path)
    m = res.metrics
    assert m["finished"] and res.steps == 12 and res.adapter_path.exists()
    assert m["final_loss"] < m["initial_loss"], m["loss_history"]
    # the saved adapter reproduces the trained model's features on a fresh base
    model = personalised_backbone(TINY, res.adapter_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        f1 = model.global_features(x, "cls+mean")
        f2 = personalised_backbone(TINY, res.adapter_path).global_features(x, "cls+mean")
    assert torch.equal(f1, f2)


def test_resume_gives_identical_weights(tmp_path):
    from safetensors.torch import load_file

    pz = _pz(max_steps=7)
    full = train_one_instance(pz, TINY, _data(), tmp_path / "full")
    part = train_one_instance(pz, TINY, _data(), tmp_path / "crash", stop_after=4)  # "crashes" at step 4
    assert not part.metrics["finished"] and not (tmp_path / "crash" / "adapter.safetensors").exists()
    resumed = train_one_instance(pz, TINY, _data(), tmp_path / "crash")
    assert resumed.resumed_from == 3  # last checkpoint (every 3 steps) before the crash
    a, b = load_file(full.adapter_path), load_file(resumed.adapter_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.metrics["loss_history"] == full.metrics["loss_history"]


def test_batch_size_one(tmp_path):
    res = train_one_instance(_pz(batch_size=1, max_steps=2), TINY, _data(), tmp_path)
    assert res.steps == 2 and np.isfinite(res.metrics["final_loss"])


def test_real_only_takes_the_anchors_as_positives_explicitly(tmp_path):
    from persrep.contrastive.triplets import TripletError

    d = _data()
    d.positives = []  # never a silent switch to real-only: the caller must say so
    with pytest.raises(TripletError, match="no positives"):
        train_one_instance(_pz(max_steps=2), TINY, d, tmp_path / "a")
    d.positives, d.positives_source = list(d.anchors), "real"
    res = train_one_instance(_pz(max_steps=2), TINY, d, tmp_path / "b")
    assert res.metrics["finished"] and res.metrics["positives_source"] == "real"
    assert res.metrics["num_positives"] == len(d.anchors)


def test_real_positives_mixed_in_are_named_in_the_metrics(tmp_path):
    from persrep.report.sections import _positives

    plain = train_one_instance(_pz(max_steps=1), TINY, _data(), tmp_path / "a")
    mixed = train_one_instance(_pz(max_steps=1, real_positive_share=0.5), TINY, _data(), tmp_path / "b")
    assert plain.metrics["positives_source"] == "synthetic"
    assert mixed.metrics["positives_source"] == "synthetic+real"
    assert mixed.metrics["num_positives"] == plain.metrics["num_positives"]  # the synthetic pool's size
    row = {"positives_used": "synthetic+real", "n_positives": 64}
    assert _positives(row) == "64 synthetic + real photos"
