"""Honest units (persrep.pipeline.stages.synthesis verdict): a filter that keeps nothing fails its unit, or, when the
user allowed it, trains on the real photos and every record says so; never silently."""

import json

import pandas as pd
import pytest

from persrep.config import load_settings
from persrep.pipeline import run_pipeline
from persrep.pipeline.stages.synthesis import FIX_FILTER, synthesis_verdict

TINY = ["data.toy.categories=1", "data.toy.instances_per_category=2", "data.toy.image_size=64",
        "data.toy.test_per_scene=2", "data.toy.negatives_per_category=6", "data.toy.dense_per_instance=0",
        "generator.types=[real_only, cut_paste]", "synthesis.num_positives=4",
        "personalization.max_steps=2", "personalization.batch_size=4",
        "personalization.backbones=[{name: tf_efficientnet_lite0, weights: offline, image_size: 64}]",
        "evaluation.tasks=[classification]", "tracking.enabled=false",
        # a filter nothing passes: one attempt per image, a threshold no crop of a composite reaches
        "synthesis.filter.enabled=true", "synthesis.filter.scorer=embedding",
        "synthesis.filter.threshold=0.9999", "synthesis.filter.max_attempts_per_image=1"]


def _settings(root, *extra):
    return load_settings("local", [*TINY, f"storage.root={root}", *extra])


def test_verdict_rules_on_counts():
    s = load_settings("local", ["synthesis.filter.min_kept_fraction=0.5"])
    ok = {"generator": "cut_paste", "requested": 4, "kept": 2, "errors": 0}
    assert synthesis_verdict(ok, s).status == "ok"
    low = {**ok, "kept": 1, "filter_scores": {"n": 8, "min": 0.1, "median": 0.2, "max": 0.7}}
    v = synthesis_verdict(low, s)
    assert v.status == "failed" and v.line == (
        "filter kept 1 of 4 requested positives (min 0.5 of them, threshold 0.6; scores min 0.100 / "
        f"median 0.200 / max 0.700 over 8 attempts): {FIX_FILTER}")
    s.synthesis.filter.on_empty = "real_only"
    assert synthesis_verdict(low, s).status == "fallback"
    assert synthesis_verdict({**ok, "errors": 1, "error_messages": ["E: x"]}, s).status == "failed"
    s.synthesis.max_row_errors = 1
    assert synthesis_verdict({**ok, "errors": 1}, s).status == "ok"
    # negatives are never filtered: only "no image at all" fails them
    neg = {"generator": "base", "requested": 4, "kept": 1, "errors": 0}
    assert synthesis_verdict(neg, s).status == "ok"
    assert synthesis_verdict({**neg, "kept": 0}, s).status == "failed"


def test_a_filter_that_keeps_nothing_fails_then_a_labelled_fallback_when_allowed(tmp_path):
    root = tmp_path / "root"
    said: list[str] = []
    summary = run_pipeline(_settings(root, "tracking.enabled=true"), said.append, run_id="strict")
    # the cut_paste positives units fail with one line each: counts, threshold, scores, the fix
    fails = [f for f in summary.failures if f["stage"] == "synthesis"]
    assert len(fails) == 2 and summary.exit_code == 1
    for f in fails:
        assert f["error"].startswith("filter kept 0 of 4 requested positives (min 0.5 of them, "
                                     "threshold 0.9999; scores min ")
        assert f["error"].endswith(FIX_FILTER) and f["attempts"] == 1  # deterministic: not retried
        assert f["details"]["kept"] == 0 and f["details"]["filter_scores"]["n"] == 4
    # no cut_paste adapter was trained under a false name; real_only ones were
    pz = pd.read_parquet(root / "runs" / "strict" / "results.parquet")
    personalised = pz[pz["model"] == "personalised"]
    assert set(personalised["data_config"]) == {"real_only"}
    assert set(personalised["positives_used"]) == {"real"}
    doc = json.loads((root / "runs" / "strict" / "summary.json").read_text())
    units = [u for u in doc["synthesis_units"] if u["filter_scores"]]
    assert len(units) == 2 and all(u["kept_fraction"] == 0 and u["verdict"] == "failed" for u in units)
    assert any(n.startswith("filter: 2 positives units kept 0%-0%") for n in doc["notes"])
    from mlflow import MlflowClient  # and in MLflow, on the run's parent

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    [parent] = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
                if r.info.run_name.endswith("strict")]
    assert parent.data.metrics["synthesis_kept_fraction_min"] == 0.0
    assert parent.data.metrics["synthesis_units_failed"] == 2
    assert "synthesis_units.json" in {a.path for a in client.list_artifacts(parent.info.run_id)}

    # allowed: the same published units (nothing regenerated) train on the real photos, labelled
    said.clear()
    summary = run_pipeline(_settings(root, "synthesis.filter.on_empty=real_only"), said.append, run_id="lenient")
    assert summary.exit_code == 0 and summary.stages["synthesis"]["done"] == 0
    rows = pd.read_parquet(root / "runs" / "lenient" / "results.parquet")
    cp = rows[(rows["model"] == "personalised") & (rows["data_config"] == "cut_paste")]
    assert len(cp) and set(cp["positives_used"]) == {"real_only_fallback"}
    assert set(cp["n_positives"]) == {3}  # the 3 real photos, not 4 synthetic images
    assert len(summary.fallbacks) == 2
    assert sum(m.startswith("FALLBACK personalization cut_paste:") for m in said) == 2
    assert sum(m.startswith("FALLBACK synthesis pos:") for m in said) == 2
    assert "[2 of 2 trained on real photos: real_only_fallback]" in summary.table
    page = "".join(p.read_text() for p in (root / "runs" / "lenient" / "report").glob("*.html"))
    assert "Fallback: not trained on what the label says" in page and "cut_paste:" in page
    ro = rows[(rows["model"] == "personalised") & (rows["data_config"] == "real_only")]
    assert set(ro["positives_used"]) == {"real"} and set(rows[rows["model"] == "pretrained"]["positives_used"]) == {"-"}

    # a stricter policy again: the fallback adapters are not reused as if they were fine
    summary = run_pipeline(_settings(root), said.append, run_id="strict-again")
    assert summary.exit_code == 1 and summary.stages["synthesis"]["failed"] == 2


@pytest.mark.parametrize("bad", ["synthesis.filter.on_empty=maybe", "synthesis.filter.min_kept_fraction=1.5",
                                 "synthesis.max_row_errors=-1"])
def test_policy_settings_are_validated(bad):
    from persrep.config import ConfigError

    with pytest.raises(ConfigError, match=bad.split("=")[0]):
        load_settings("local", [bad])
