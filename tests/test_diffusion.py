"""Diffusion components: tiny-from-config, local directories, offline errors, per-row sampling."""

from __future__ import annotations

import hashlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded in tests

import numpy as np
import pytest
import torch

from helpers import assert_same_up_to_float_rounding as _assert_same_up_to_float_rounding
from helpers import pixels as _pixels
from persrep.models.diffusion import (SCHEDULER_NAMES, TINY_RESOLUTION, ModelUnavailableError,
                                      byte_level_clip_tokenizer, component_identity, generate_images,
                                      load_components, make_pipeline)

PROMPT = "a photo of <new1> mug"


def _weights_digest(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode() + tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def tiny_pipe():
    return make_pipeline(load_components("tiny", "cpu"), "pndm")


def test_tokenizer_handles_identifier_categories_and_unicode_without_unknowns():
    tok = byte_level_clip_tokenizer()
    for prompt in [PROMPT, "A photo of water_bottle", "Ein Bäcker, 日本 #42!"]:
        ids = tok(prompt).input_ids
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        body = ids[1:-1]
        # eos doubles as unk: an unknown character would show up as eos inside the body
        assert tok.eos_token_id not in body
        assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == prompt.lower().replace(" ", "")
    padded = tok(PROMPT, padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(padded) == 77


def test_tiny_components_are_identical_every_time_and_leave_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = load_components("tiny", "cpu")
    after_build = torch.rand(3)
    second = load_components("tiny", "cpu")
    assert torch.equal(expected_next, after_build), "building tiny components consumed global randomness"
    for name in ("unet", "vae", "text_encoder"):
        assert _weights_digest(getattr(first, name)) == _weights_digest(getattr(second, name))
    assert first.resolution == TINY_RESOLUTION and first.vae_scale_factor == 2
    assert first.text_encoder.config.vocab_size == len(first.tokenizer)


def test_same_seed_gives_same_image_alone_or_in_any_batch(tiny_pipe):
    batch = generate_images(tiny_pipe, ["a dog", PROMPT, "a red cat on a mat"], [7, 3, 11], 5.0, 4, 64)
    alone = generate_images(tiny_pipe, [PROMPT], [3], 5.0, 4, 64)
    again = generate_images(tiny_pipe, [PROMPT, "a dog"], [3, 8], 5.0, 4, 64)
    _assert_same_up_to_float_rounding(batch[1], alone[0])
    _assert_same_up_to_float_rounding(again[0], alone[0])
    other_seed = generate_images(tiny_pipe, [PROMPT], [4], 5.0, 4, 64)
    assert not np.array_equal(_pixels(other_seed[0]), _pixels(alone[0]))


def test_guidance_scale_changes_the_image(tiny_pipe):
    low = generate_images(tiny_pipe, [PROMPT], [3], 1.0, 4, 64)[0]
    high = generate_images(tiny_pipe, [PROMPT], [3], 7.5, 4, 64)[0]
    assert np.abs(_pixels(low) - _pixels(high)).mean() > 0.5


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_every_scheduler_samples(name):
    pipe = make_pipeline(load_components("tiny", "cpu"), name)
    image = generate_images(pipe, [PROMPT], [1], 5.0, 3, 64)[0]
    assert image.size == (64, 64) and _pixels(image).std() > 0


def test_unknown_scheduler_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown scheduler 'lms'.*pndm"):
        make_pipeline(load_components("tiny", "cpu"), "lms")


def test_unknown_model_id_offline_fails_with_one_actionable_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelUnavailableError) as info:
        load_components("nobody/no-such-diffusion-model", "cpu")
    text = str(info.value)
    assert "\n" not in text
    assert "nobody/no-such-diffusion-model" in text and str(tmp_path / "empty-cache") in text
    assert "HF_HOME" in text and "local directory" in text
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no hub stack trace


def test_local_directory_missing_subfolders_names_them(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelUnavailableError, match=r"missing subfolders \['vae', 'text_encoder'"):
        load_components(str(tmp_path), "cpu")


def test_local_diffusers_directory_loads_and_samples_like_the_original(tmp_path, tiny_pipe):
    tiny = load_components("tiny", "cpu")
    model_dir = tmp_path / "my-sd"
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        getattr(tiny, name).save_pretrained(model_dir / name)
    loaded = load_components(str(model_dir), "cpu")
    assert _weights_digest(loaded.unet) == _weights_digest(tiny.unet)
    assert loaded.tokenizer(PROMPT).input_ids == tiny.tokenizer(PROMPT).input_ids
    expected = generate_images(tiny_pipe, [PROMPT], [5], 5.0, 4, 64)[0]
    got = generate_images(make_pipeline(loaded, "pndm"), [PROMPT], [5], 5.0, 4, 64)[0]
    assert np.array_equal(_pixels(expected), _pixels(got))


def test_component_identity_is_stable_and_tracks_content(tmp_path):
    assert component_identity("tiny") == component_identity("tiny")
    assert component_identity("runwayml/stable-diffusion-v1-5") == {
        "kind": "hub", "model_id": "runwayml/stable-diffusion-v1-5"}
    dirs = [tmp_path / "a" / "sd", tmp_path / "b" / "sd"]
    for d in dirs:
        (d / "unet").mkdir(parents=True)
        (d / "unet" / "config.json").write_text('{"block_out_channels": [32, 64]}')
        (d / "unet" / "model.safetensors").write_bytes(b"x" * 10)
    # same content in another place (another machine) -> same identity
    assert component_identity(str(dirs[0])) == component_identity(str(dirs[1]))
    (dirs[1] / "unet" / "config.json").write_text('{"block_out_channels": [64, 128]}')
    assert component_identity(str(dirs[0])) != component_identity(str(dirs[1]))
