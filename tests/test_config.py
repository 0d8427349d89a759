import pytest

from persrep.config import (ConfigError, Settings, available_configs, content_key, flatten,
                            load_settings, parse_override)


def test_named_configs_load_and_differ():
    assert {"local", "offline-real", "paper"} <= set(available_configs())
    local, paper = load_settings("local"), load_settings("paper")
    assert local.data.path == "toy" and local.generator.base_model == "tiny"
    assert paper.generator.base_model == "runwayml/stable-diffusion-v1-5"


def test_paper_config_has_the_published_hyperparameters():
    p = load_settings("paper")
    db = p.generator.dreambooth
    assert (db.steps, db.learning_rate, db.num_class_images, db.prior_loss_weight) == (400, 2e-6, 200, 1.0)
    assert db.train_text_encoder and db.resolution == 512 and db.use_8bit_adam
    assert p.synthesis.num_positives == 450 and p.synthesis.inference_steps == 50
    pz = p.personalization
    assert (pz.lora.rank, pz.lora.alpha, pz.lora.dropout) == (16, 0.5, 0.3)
    assert (pz.learning_rate, tuple(pz.betas), pz.batch_size, pz.epochs) == (3e-4, (0.5, 0.999), 16, 2)
    assert (pz.num_triplets, pz.temperature, pz.seed, pz.feature) == (4500, 0.07, 1234, "cls+mean")
    assert pz.negatives == "generated"  # never in-pool by default (leakage: docs/PROTOCOL.md)
    assert {b.name for b in pz.backbones} == {"vit_base_patch14_dinov2.lvd142m",
                                              "vit_base_patch16_clip_224.openai", "vit_base_patch16_224.mae"}


def test_overrides_apply_with_yaml_typing():
    s = load_settings("local", ["synthesis.cfg=[4, 5, 7.5]", "personalization.learning_rate=1e-4",
                                "generator.types=[real_only]", "data.toy.seed=7"])
    assert s.synthesis.cfg == [4.0, 5.0, 7.5]
    assert s.personalization.learning_rate == pytest.approx(1e-4)
    assert s.generator.types == ["real_only"] and s.data.toy.seed == 7


@pytest.mark.parametrize("override, needle", [
    ("personalization.lerning_rate=1", "personalization.lerning_rate"),
    ("nosuchsection.x=1", "nosuchsection"),
    ("personalization.batch_size=abc", "personalization.batch_size"),
    ("synthesis.cfg=[-3]", "out of range"),
    ("synthesis.cfg=[500]", "out of range"),
    ("personalization.temperature=0", "personalization.temperature"),
    ("generator.types=[diffusion_magic]", "generator.types"),
    ("generator.types=[]", "generator.types"),
    ("storage.root=gs://bucket/x", "unsupported storage scheme"),
    ("storage.root=s3://", "malformed S3 URI"),
    ("storage.root=s3://AB/x", "malformed S3 URI"),
    ("synthesis.caption_sources=[captions]", "captions_file"),
    ("personalization.negatives=external", "external_negatives"),
])
def test_bad_settings_fail_with_one_clear_line(override, needle):
    with pytest.raises(ConfigError) as exc:
        load_settings("paper", [override])
    msg = str(exc.value)
    assert needle in msg and msg.startswith("settings error")
    assert len(msg.splitlines()) == 1


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        parse_override("synthesis.cfg")
    with pytest.raises(ConfigError, match="empty key part"):
        parse_override("synthesis..cfg=1")
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_settings("local", ["synthesis.cfg.x=1"])


def test_unknown_config_name_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no such named configuration"):
        load_settings("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(str(bad))
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_settings(str(lst))


def test_content_key_is_stable_and_sensitive():
    a = load_settings("local")
    b = load_settings("local")
    assert content_key(a.personalization, "in1") == content_key(b.personalization, "in1")
    assert content_key({"x": 1, "y": 2}) == content_key({"y": 2, "x": 1})  # order-free
    c = load_settings("local", ["personalization.learning_rate=0.5"])
    assert content_key(a.personalization) != content_key(c.personalization)
    assert content_key(a.personalization, "in1") != content_key(a.personalization, "in2")
    # a section the unit does not depend on does not change its key
    d = load_settings("local", ["evaluation.batch_size=7"])
    assert content_key(a.personalization) == content_key(d.personalization)
    assert len(content_key("x")) == 16 and content_key("x") == content_key("x")


def test_flatten_for_tracking():
    flat = flatten(load_settings("local"))
    assert flat["personalization.lora.rank"] == 16
    assert flat["synthesis.cfg"] == "[5.0]"
    assert all(not isinstance(v, dict) for v in flat.values())


def test_defaults_validate_assignment():
    s = Settings()
    with pytest.raises(Exception):
        s.personalization.batch_size = -1


def test_old_synthesis_cut_paste_moves_to_generator_cut_paste_with_one_note(tmp_path):
    """Issue 28: cut-and-paste owns its section, generator.cut_paste; a file or an override that
    still says synthesis.cut_paste loads the same settings, with one note."""
    import yaml

    note = ("settings: synthesis.cut_paste is now generator.cut_paste; read from the old place "
            "(write generator.cut_paste to silence this note)")
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump({"synthesis": {"resolution": 64, "cut_paste": {"backgrounds": "/bg", "flip": False}}}))
    new = tmp_path / "new.yaml"
    new.write_text(yaml.safe_dump({"synthesis": {"resolution": 64}, "generator": {"cut_paste": {"backgrounds": "/bg", "flip": False}}}))
    a, b = load_settings(str(old)), load_settings(str(new))
    assert a.model_dump() == b.model_dump() and a.generator.cut_paste.flip is False
    assert a.notes == [note] and b.notes == []
    # an override in the old spelling wins over the file's value at the new place
    c = load_settings(str(new), ["synthesis.cut_paste.backgrounds=generated"])
    assert c.generator.cut_paste.backgrounds == "generated" and c.generator.cut_paste.flip is False
    assert c.notes == [note]
    assert Settings.model_validate({"synthesis": {"cut_paste": {"num_backgrounds": 3}}}).generator.cut_paste.num_backgrounds == 3
    with pytest.raises(ConfigError, match="generator.cut_paste.bogus = 1: unknown key"):
        load_settings(str(old), ["synthesis.cut_paste.bogus=1"])
    # the shipped configurations use the new place
    assert all(load_settings(name).notes == [] for name in available_configs())
