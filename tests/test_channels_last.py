"""personalization.channels_last: the same training in another memory format.

Oracle: the contiguous run with the same seed. Same maths, another float summation order, so we
assert agreement within a tolerance, not bit equality: per-step losses within 1e-3 relative; the
adapters' features on the training photos within 1e-2 relative (L2). Raw LoRA tensors are only
bounded by Adam's step: where a gradient is ~0 its sign can flip with rounding, and Adam moves a
parameter by up to ~lr per step either way, so |diff| <= 2 * steps * lr.
"""

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from persrep.config import BackboneSettings, PersonalizationSettings
from persrep.contrastive.train import TrainingData, personalised_backbone, train_one_instance
from persrep.models.backbones import eval_transform

CNN = BackboneSettings(name="tf_efficientnet_lite0", weights="tiny", image_size=48)


def _obj(seed, color):
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (56, 56), tuple(int(c) for c in rng.integers(150, 255, 3)))
    x, y = rng.integers(4, 20, 2)
    ImageDraw.Draw(img).ellipse([x, y, x + 28, y + 28], fill=color)
    return img


def test_channels_last_training_matches_contiguous(tmp_path):
    data = TrainingData("red", [_obj(i, (200, 20, 20)) for i in range(3)],
                        [_obj(10 + i, (200, 20, 20)) for i in range(6)],
                        [_obj(20 + i, (20, 20, 200)) for i in range(6)])
    out = {}
    for cl in (False, True):
        pz = PersonalizationSettings(batch_size=4, num_triplets=16, num_positives=6, max_steps=3,
                                     seed=5, channels_last=cl)
        res = train_one_instance(pz, CNN, data, tmp_path / f"cl{cl}")
        out[cl] = (res.metrics["loss_history"], load_file(str(res.adapter_path)))
    (loss_a, ta), (loss_b, tb) = out[False], out[True]
    assert len(loss_a) == len(loss_b) == 3
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-3)
    assert ta.keys() == tb.keys()
    diff = max(float((ta[k] - tb[k]).abs().max()) for k in ta)
    moved = max(float(ta[k].abs().max()) for k in ta if "lora_B" in k)
    assert moved > 1e-4  # training changed the adapter (lora_B starts at zero)
    assert diff <= 2 * 3 * 1e-3, diff
    assert all(t.is_contiguous() for t in tb.values())
    feats = []
    for cl in (False, True):
        model = personalised_backbone(CNN, tmp_path / f"cl{cl}" / "adapter.safetensors")
        x = torch.stack([eval_transform(CNN)(im) for im in data.anchors + data.negatives])
        with torch.inference_mode():
            feats.append(model.global_features(x, "cls+mean"))
    rel = float((feats[0] - feats[1]).norm() / feats[0].norm())
    assert rel <= 1e-2, rel
