"""DreamBooth (plain + masked) on tiny models, base-model negatives, and the generator registry."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded in tests

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from persrep.config import Settings
from persrep.generation.dreambooth_settings import DreamBoothSettings
from persrep.generation import dreambooth as db
from persrep.generation.base import (IDENTIFIER, GeneratorArtifact, InstanceData, PersonalizedGenerator, Sampler,
                                     SampleRow, get_generator, register_generator, registered_types)
from persrep.generation.plan import build_rows
from helpers import assert_same_up_to_float_rounding as _assert_same_up_to_float_rounding
from helpers import pixels as _pixels
from persrep.models.diffusion import generate_images, load_components, make_pipeline

RES = 64


def _object_image(colour, background=(40, 40, 40), size=RES) -> Image.Image:
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[:] = background
    pixels[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = colour
    return Image.fromarray(pixels)


def _object_mask(size=RES) -> Image.Image:
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 255
    return Image.fromarray(mask)


def _instance(n=3, masks=True) -> InstanceData:
    colours = [(220, 30, 30), (200, 60, 40), (230, 20, 60), (190, 40, 40)][:n]
    return InstanceData("red_mug", "mug", [_object_image(c) for c in colours],
                        [_object_mask() for _ in colours] if masks else None)


def _train_settings(**overrides) -> DreamBoothSettings:
    base = dict(steps=5, learning_rate=1e-3, resolution=RES, num_class_images=2, lora_rank=4, seed=0)
    return DreamBoothSettings(**{**base, **overrides})


def _settings(**dreambooth) -> Settings:
    settings = Settings()
    settings.generator.base_model = "tiny"
    settings.generator.dreambooth = _train_settings(**dreambooth)
    syn = settings.synthesis
    syn.resolution, syn.inference_steps, syn.batch_size, syn.cfg = RES, 4, 4, [5.0]
    return settings


CLASS_IMAGES = [_object_image((200, 200, 0), (90, 120, 90)), _object_image((0, 160, 200), (120, 90, 60))]


# ---------------------------------------------------------------------------------------------
# training
def test_dreambooth_loss_falls_on_a_toy_instance():
    instance = _instance()
    seen: list[tuple[int, float]] = []
    result = db.train_dreambooth(load_components("tiny", "cpu"), instance.train_images, "mug",
                                 _train_settings(steps=20), class_images=CLASS_IMAGES,
                                 progress=lambda step, loss: seen.append((step, loss)))
    assert [s for s, _ in seen] == list(range(1, 21)) and len(result.losses) == 20
    first, last = np.mean(result.losses[:5]), np.mean(result.losses[-5:])
    assert last < 0.6 * first, f"loss did not fall: first 5 {first:.3f}, last 5 {last:.3f}"
    assert set(result.files) == {"unet.safetensors", "text_encoder.safetensors"}


@pytest.mark.parametrize("variant", [dict(use_lora=False), dict(use_lora=True, masked=True)])
def test_training_twice_with_the_same_seed_gives_identical_weights(variant):
    masked = variant.pop("masked", False)
    instance = _instance()

    def run(seed):
        return db.train_dreambooth(load_components("tiny", "cpu"), instance.train_images, "mug",
                                   _train_settings(seed=seed, steps=3, **variant), class_images=CLASS_IMAGES,
                                   masks=instance.train_masks if masked else None, masked=masked)

    first, second, other = run(0), run(0), run(1)
    assert first.files == second.files and first.losses == second.losses
    assert first.files != other.files


def test_masked_weights_keep_the_foreground_and_floor_the_background():
    masks = torch.zeros(1, 1, 64, 64)
    masks[..., 16:48, 16:48] = 1
    weights = db.latent_mask_weights(masks, (32, 32), floor=0.01)
    assert weights.shape == (1, 1, 32, 32)
    assert torch.allclose(weights[..., 8:24, 8:24], torch.tensor(1.0))
    assert torch.allclose(weights[..., :8, :], torch.tensor(0.01 / 1.01))


def test_masked_loss_gradient_ignores_background_up_to_the_floor():
    floor = 0.01
    masks = torch.zeros(1, 1, 64, 64)
    masks[..., 16:48, 16:48] = 1
    weights = db.latent_mask_weights(masks, (32, 32), floor)
    background = weights < 0.5
    gen = torch.Generator().manual_seed(0)
    prediction = torch.randn(1, 4, 32, 32, generator=gen)
    target_a = torch.randn(1, 4, 32, 32, generator=gen)
    target_b = target_a + torch.randn(1, 4, 32, 32, generator=gen) * background  # background only

    def grad(loss_fn, target):
        pred = prediction.clone().requires_grad_(True)
        loss_fn(pred, target).backward()
        return pred.grad

    masked = lambda p, t: db.masked_mse(p, t, weights)  # noqa: E731
    plain = torch.nn.functional.mse_loss
    masked_change = grad(masked, target_b) - grad(masked, target_a)
    plain_change = grad(plain, target_b) - grad(plain, target_a)
    assert plain_change.abs().max() > 0
    # the residual is weighted twice (prediction and target), so its gradient by the weight squared
    w_bg = floor / (1 + floor)
    assert torch.allclose(masked_change, plain_change * w_bg**2, atol=1e-12)
    assert masked_change.abs().max() <= floor * plain_change.abs().max()
    # the same change inside the object moves the gradient fully
    target_c = target_a + torch.randn(1, 4, 32, 32, generator=gen) * ~background
    assert torch.allclose(grad(masked, target_c) - grad(masked, target_a),
                          grad(plain, target_c) - grad(plain, target_a), atol=1e-12)


def test_instance_image_count_and_mask_rules():
    with pytest.raises(ValueError, match="no training images"):
        db.check_instance_images(InstanceData("x", "mug", []), masked=False)
    with pytest.raises(ValueError, match="no train masks.*'dreambooth'"):
        db.check_instance_images(_instance(masks=False), masked=True)
    for n in (2, 4):
        with pytest.warns(UserWarning, match=f"has {n} training images.*exactly 3"):
            db.check_instance_images(_instance(n), masked=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        db.check_instance_images(_instance(3), masked=True)


def test_missing_8bit_adam_falls_back_to_adamw_without_a_warning_per_unit(monkeypatch):
    """The run's pre-flight warns once (persrep.models.accelerator, tests/test_paper_gaps.py);
    a worker falls back quietly instead of warning once per process."""
    import warnings

    monkeypatch.setattr(db, "_warned_no_8bit", False)
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)  # import fails
    params = [torch.nn.Parameter(torch.zeros(2))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = db._make_optimizer(params, _train_settings(use_8bit_adam=True), on_gpu=True)
        db._make_optimizer(params, _train_settings(use_8bit_adam=True), on_gpu=True)
    assert isinstance(first, torch.optim.AdamW)


def test_class_images_are_cached_and_reused(tmp_path):
    args = dict(base_model="tiny", category="mug", resolution=RES, seed=0, cache_dir=tmp_path,
                inference_steps=2)
    first = db.class_images(count=2, **args)
    files = sorted(tmp_path.rglob("*.png"))
    stamps = [f.stat().st_mtime_ns for f in files]
    more = db.class_images(count=3, **args)  # reuses the first two, draws one more
    assert len(files) == 2 and len(sorted(tmp_path.rglob("*.png"))) == 3
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert all(np.array_equal(_pixels(a), _pixels(b)) for a, b in zip(first, more))
    assert not np.array_equal(_pixels(more[0]), _pixels(more[1]))


# ---------------------------------------------------------------------------------------------
# the generator: prepare -> publish -> load -> sample
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoRA masked-DreamBooth artifact, round-tripped through files on disk."""
    out = tmp_path_factory.mktemp("db")
    settings = _settings(use_lora=True, learning_rate=2e-2, steps=6)
    generator = get_generator("masked_dreambooth", settings, device="cpu")
    instance = _instance()
    artifact = generator.prepare(instance, out)
    for name, data in artifact.files.items():
        (out / name).write_bytes(data)
    reread = GeneratorArtifact(artifact.generator_type, artifact.instance,
                               {n: (out / n).read_bytes() for n in artifact.files}, artifact.settings, artifact.key)
    return settings, generator, instance, artifact, reread


def _rows(prompts_seeds_cfgs):
    return [SampleRow("red_mug", "positive", "masked_dreambooth", p, cfg, seed, "template", i)
            for i, (p, seed, cfg) in enumerate(prompts_seeds_cfgs)]


def test_artifact_has_weights_settings_and_its_key(trained):
    settings, generator, instance, artifact, _ = trained
    assert set(artifact.files) == {"unet_lora.safetensors", "text_encoder_lora.safetensors", "dreambooth.json"}
    assert artifact.key == generator.artifact_key(instance)
    assert artifact.settings["settings"]["masked"] is True and len(artifact.settings["losses"]) == 6
    # another instance (other pixels) or other settings give another key
    assert generator.artifact_key(_instance(masks=True)) == artifact.key
    assert generator.artifact_key(InstanceData("red_mug", "mug", _instance().train_images[:2],
                                               _instance().train_masks[:2])) != artifact.key
    assert get_generator("dreambooth", settings).artifact_key(instance) != artifact.key


def test_reloaded_artifact_reproduces_images_exactly(trained):
    settings, generator, _, artifact, reread = trained
    rows = _rows([(f"a photo of {IDENTIFIER} mug", 3, 5.0), (f"a {IDENTIFIER} mug on a desk", 9, 5.0)])
    generator.load(artifact)
    original = generator.sample(rows)
    fresh = get_generator("masked_dreambooth", settings, device="cpu")
    fresh.load(reread)
    again = fresh.sample(rows)
    assert [s.row for s in again] == rows
    for a, b in zip(original, again):
        assert np.array_equal(_pixels(a.image), _pixels(b.image))
    # the personalised weights matter: the base model draws something else from the same noise
    base = make_pipeline(load_components("tiny", "cpu"), settings.synthesis.scheduler)
    plain = generate_images(base, [rows[0].prompt], [3], 5.0, settings.synthesis.inference_steps, RES)[0]
    assert not np.array_equal(_pixels(plain), _pixels(original[0].image))


def test_a_row_gives_the_same_image_alone_or_in_a_mixed_batch_and_cfg_matters(trained):
    _, generator, _, artifact, _ = trained
    generator.load(artifact)
    target = (f"a photo of {IDENTIFIER} mug", 21, 5.0)
    batch = generator.sample(_rows([("a red thing", 1, 5.0), target, ("x", 2, 7.5), ("y", 4, 5.0)]))
    alone = generator.sample(_rows([target]))
    _assert_same_up_to_float_rounding(batch[1].image, alone[0].image)
    # a tiny random model listens to its prompt only faintly, so the change is small but real
    other_cfg = generator.sample(_rows([(target[0], target[1], 9.0)]))
    assert np.abs(_pixels(other_cfg[0].image) - _pixels(alone[0].image)).mean() > 0.1


def test_personalised_generator_refuses_negative_rows(trained):
    _, generator, _, artifact, _ = trained
    generator.load(artifact)
    row = SampleRow("mug_negatives", "negative", "base", "A photo of mug", 5.0, 1)
    with pytest.raises(ValueError, match="negatives come from the base model"):
        generator.sample([row])


def test_negatives_come_from_the_base_model_without_the_identifier():
    settings = _settings()
    settings.synthesis.cfg, settings.synthesis.num_negatives_per_category = [4.0, 5.0], 5
    settings.generator.types = ["dreambooth"]  # a diffusion config per cfg: one negatives pool each
    sampler = db.BaseModelSampler(Sampler.of(settings), device="cpu")
    groups = build_rows(settings, {"mug_1": "mug"})  # the pipeline's rows: one group per cfg
    negatives = {g: rows for g, rows in groups.items() if g.startswith("neg:")}
    assert sorted(negatives) == ["neg:4:template:mug", "neg:5:template:mug"]
    rows = [r for g in sorted(negatives) for r in negatives[g]]
    assert all(IDENTIFIER not in r.prompt and r.role == "negative" and r.generator == "base" for r in rows)
    assert [r.cfg for r in rows] == [4.0] * 5 + [5.0] * 5 and len({r.seed for r in rows}) == 10
    images = sampler.sample(rows[:2])
    assert [s.row for s in images] == rows[:2] and images[0].image.size == (RES, RES)
    leaking = SampleRow("mug_negatives", "negative", "base", f"a photo of {IDENTIFIER} mug", 5.0, 1)
    with pytest.raises(ValueError, match="must not contain the identifier"):
        sampler.sample([leaking])


# ---------------------------------------------------------------------------------------------
# registry
def test_registry_finds_builtin_types_and_accepts_a_new_one():
    assert type(get_generator("dreambooth", _settings())) is db.DreamBoothGenerator
    assert get_generator("masked_dreambooth", _settings()).masked is True
    with pytest.raises(ValueError, match="unknown generator type 'gan'.*dreambooth"):
        get_generator("gan", _settings())

    @register_generator
    class EchoGenerator(PersonalizedGenerator):
        type_name = "echo_test"
        needs_training = False

        def prepare(self, instance, out_dir):
            return GeneratorArtifact(self.type_name, instance.name, key=self.artifact_key(instance))

        def load(self, artifact):
            self.loaded = artifact

        def sample(self, rows):
            return []

    assert "echo_test" in registered_types()
    assert isinstance(get_generator("echo_test", _settings()), EchoGenerator)
    with pytest.raises(ValueError, match="already registered"):
        register_generator(type("Other", (EchoGenerator,), {"type_name": "dreambooth"}))
    with pytest.raises(TypeError, match="needs_training"):
        register_generator(type("NoFlag", (PersonalizedGenerator,), {"type_name": "no_flag"}))


def test_prepare_refuses_masked_without_masks(tmp_path):
    generator = get_generator("masked_dreambooth", _settings(), device="cpu")
    with pytest.raises(ValueError, match="use generator type 'dreambooth'"):
        generator.prepare(_instance(masks=False), tmp_path)
    assert not any(Path(tmp_path).iterdir())  # failed before any compute


@pytest.mark.parametrize("use_lora", [False, True])
def test_optimizer_state_is_freed_before_the_weights_are_serialised(monkeypatch, use_lora):
    """Full fine-tuning's AdamW state is twice the trained weights: holding it while serialising
    made the end of an SD 1.5-size unit its memory peak (bench/paper_dryrun_full.json)."""
    import gc
    import weakref

    refs: list[weakref.ref] = []
    make = db._make_optimizer
    monkeypatch.setattr(db, "_make_optimizer", lambda *a, **k: refs.append(weakref.ref(opt := make(*a, **k))) or opt)
    alive_at_save: list[bool] = []
    serialise = db._to_safetensors
    monkeypatch.setattr(db, "_to_safetensors",
                        lambda state: (gc.collect(), alive_at_save.append(refs[0]() is not None))
                        and serialise(state))
    instance = _instance()
    result = db.train_dreambooth(load_components("tiny", "cpu"), instance.train_images, "mug",
                                 _train_settings(steps=2, use_lora=use_lora, prior_preservation=False))
    assert refs and alive_at_save and not any(alive_at_save)
    assert any(name.startswith("unet") for name in result.files)
