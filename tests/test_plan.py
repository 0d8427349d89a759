import json

import pytest

from persrep.config import load_settings
from persrep.generation.base import IDENTIFIER
from persrep.generation.plan import (PlanError, build_rows, data_configs, load_captions,
                                     negative_configs, strip_identifier)

INSTANCES = {"mug_0": "mug", "mug_1": "mug", "bottle_0": "bottle"}


def _settings(*over):
    return load_settings("local", ["generator.types=[real_only, cut_paste, dreambooth]",
                                   "synthesis.num_positives=5", "synthesis.num_negatives_per_category=4",
                                   *over])


def test_data_configs_collapse_diffusion_free_types():
    s = _settings("synthesis.cfg=[4, 5, 7.5]")
    labels = [c.label for c in data_configs(s)]
    assert labels == ["real_only", "cut_paste", "dreambooth/cfg4/template",
                      "dreambooth/cfg5/template", "dreambooth/cfg7.5/template"]
    assert len({c.key for c in data_configs(s)}) == 5
    assert negative_configs(s) == [(4.0, "template"), (5.0, "template"), (7.5, "template")]


def test_rows_grouped_seeded_and_negatives_have_no_identifier():
    s = _settings()
    groups = build_rows(s, INSTANCES)
    # 3 configs x 3 instances positive groups + 1 negative config x 2 categories
    assert len([g for g in groups if g.startswith("pos:")]) == 9
    assert sorted(g for g in groups if g.startswith("neg:")) == ["neg:5:template:bottle", "neg:5:template:mug"]
    rows = [r for rr in groups.values() for r in rr]
    seeds = [r.seed for r in rows]
    assert len(set(seeds)) == len(seeds)  # no two rows share noise
    for r in rows:
        if r.role == "negative":
            assert IDENTIFIER not in r.prompt and r.generator == "base"
            assert r.prompt == "A photo of " + r.instance.removesuffix("_negatives")
    db = [r for r in rows if r.generator == "dreambooth"]
    assert all(r.prompt == f"a photo of {IDENTIFIER} {INSTANCES[r.instance]}" for r in db)
    assert build_rows(s, INSTANCES) == groups  # deterministic
    assert build_rows(_settings("synthesis.seed=1"), INSTANCES) != groups


def test_captions_source(tmp_path):
    caps = {"mug_0": ["A <new1> mug on a desk", "A <new1> mug in a car"],
            "mug": ["A <new1> mug at the beach"], "bottle": ["A <new1> bottle on ice"]}
    f = tmp_path / "caps.json"
    f.write_text(json.dumps(caps))
    s = _settings("synthesis.caption_sources=[captions]", f"synthesis.captions_file={f}")
    groups = build_rows(s, INSTANCES)
    key = next(g for g in groups if g.startswith("pos:") and g.endswith(":mug_0")
               and groups[g][0].generator == "dreambooth")
    assert [r.prompt for r in groups[key][:3]] == ["A <new1> mug on a desk", "A <new1> mug in a car",
                                                  "A <new1> mug on a desk"]
    key1 = next(g for g in groups if g.endswith(":mug_1") and groups[g][0].generator == "dreambooth")
    assert groups[key1][0].prompt == "A <new1> mug at the beach"  # falls back to the category
    neg = groups["neg:5:captions:mug"]
    assert all(IDENTIFIER not in r.prompt for r in neg) and neg[0].prompt == "A mug on a desk"


@pytest.mark.parametrize("content, needle", [
    ("[1, 2]", "expected a non-empty object"),
    ('{"mug": []}', "non-empty list"),
    ('{"mug": ["A mug on a desk"]}', "without the identifier"),
    ("{not json", "invalid JSON"),
])
def test_bad_captions_files(tmp_path, content, needle):
    f = tmp_path / "c.json"
    f.write_text(content)
    with pytest.raises(PlanError, match=needle):
        load_captions(f)


def test_strip_identifier():
    assert strip_identifier("A <new1> mug on a desk") == "A mug on a desk"
    assert strip_identifier("a photo of <new1> mug") == "a photo of mug"


def test_user_prompt_list_source():
    s = _settings("synthesis.caption_sources=[prompts]",
                  "synthesis.prompts=['a <new1> {category} on a desk', 'a <new1> {category} at night']")
    groups = build_rows(s, INSTANCES)
    key = next(g for g in groups if g.endswith(":bottle_0") and groups[g][0].generator == "dreambooth")
    assert [r.prompt for r in groups[key][:3]] == ["a <new1> bottle on a desk", "a <new1> bottle at night",
                                                  "a <new1> bottle on a desk"]
    assert [r.prompt for r in groups["neg:5:prompts:mug"][:2]] == ["a mug on a desk", "a mug at night"]


@pytest.mark.parametrize("over, needle", [
    (["synthesis.caption_sources=[prompts]"], "synthesis.prompts is not set"),
    (["synthesis.prompts=['a mug on a desk']"], "lacks the identifier"),
    (["synthesis.prompts=[]"], "empty list"),
])
def test_user_prompt_list_errors(over, needle):
    from persrep.config import ConfigError

    with pytest.raises(ConfigError, match=needle):
        _settings(*over)
