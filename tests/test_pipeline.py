"""The whole pipeline on a tiny toy world: in-process, then on the shared local Ray cluster."""

import json

import pandas as pd
import pytest

from persrep.config import load_settings
from persrep.pipeline import run_pipeline
from persrep.pipeline.executor import LocalExecutor
from worlds import TINY


def _settings(root, *extra):
    return load_settings("local", [*TINY, f"storage.root={root}", *extra])


def _results(summary, root):
    return pd.read_parquet(f"{root}/runs/{summary.run_id}/results.parquet")


def test_pipeline_in_process_then_resume(tmp_path):
    root = tmp_path / "root"
    s = _settings(root)
    summary = run_pipeline(s, run_id="first")
    assert summary.exit_code == 0, summary.failures
    assert summary.stages["generator_prep"]["done"] == 4          # dreambooth x 4 instances
    assert summary.stages["synthesis"]["done"] == 8               # cut_paste + dreambooth positives
    assert summary.stages["personalization"]["done"] == 12        # 3 data configs x 4 instances
    assert summary.stages["evaluation"]["done"] == 13             # pretrained + 12 adapters
    frame = _results(summary, root)
    assert set(frame["model"]) == {"pretrained", "personalised"}
    assert set(frame["data_config"]) == {"-", "real_only", "cut_paste", "dreambooth/cfg5/template"}
    assert set(frame["task"]) == {"classification", "retrieval", "detection", "segmentation"}
    doc = json.loads((root / "runs" / "first" / "summary.json").read_text())
    assert doc["headline"] and not doc["leakage_warning"]
    assert "classification" in summary.table
    # a re-run with the same settings computes nothing and gives the same numbers
    again = run_pipeline(s, run_id="second")
    assert all(c["done"] == 0 for c in again.stages.values()), again.stages
    pd.testing.assert_frame_equal(frame, _results(again, root))


def test_failed_unit_is_retried_then_reported(tmp_path):
    calls = {"n": 0}

    from persrep.pipeline.stages import personalization

    real = personalization.run_personalize_unit

    def flaky(ctx, unit):
        calls["n"] += 1
        if unit.instance == "mug_0" and unit.config.generator == "real_only":
            raise RuntimeError("simulated worker failure")
        return real(ctx, unit)

    s = _settings(tmp_path / "root", "generator.types=[real_only]")
    personalization.run_personalize_unit = flaky
    try:
        summary = run_pipeline(s, executor=LocalExecutor(max_retries=1))
    finally:
        personalization.run_personalize_unit = real
    assert summary.exit_code == 1
    assert summary.failures == [{"stage": "personalization", "unit": "real_only:tf_efficientnet_lite0:mug_0",
                                 "error": "RuntimeError: simulated worker failure", "attempts": 2}]
    assert summary.stages["personalization"] == {"done": 3, "skipped": 0, "failed": 1, "retried": 1}
    # the other instances were evaluated; the failed one is absent, not half there
    frame = _results(summary, tmp_path / "root")
    per = frame[frame["model"] == "personalised"]
    assert sorted(per["instance"].unique()) == ["bottle_0", "bottle_1", "mug_1"]
    # a re-run (fault gone) completes only the missing unit
    again = run_pipeline(s)
    assert again.stages["personalization"] == {"done": 1, "skipped": 3, "failed": 0, "retried": 0}


def test_in_pool_negatives_are_flagged(tmp_path):
    s = _settings(tmp_path / "root", "generator.types=[real_only]", "personalization.negatives=in_pool",
                  "evaluation.tasks=[classification]")
    summary = run_pipeline(s)
    assert any("leakage" in n for n in summary.notes)
    doc = json.loads((tmp_path / "root" / "runs" / summary.run_id / "summary.json").read_text())
    assert doc["leakage_warning"] is True
    assert set(_results(summary, tmp_path / "root")["negatives_source"]) == {"in_pool"}


@pytest.mark.ray
def test_pipeline_on_ray_matches_in_process(tmp_path, ray_local):
    from persrep.distributed.ray_executor import RayExecutor

    extra = ["generator.types=[real_only, cut_paste]"]
    local = run_pipeline(_settings(tmp_path / "a", *extra), run_id="x")
    remote = run_pipeline(_settings(tmp_path / "b", *extra), executor=RayExecutor(max_retries=1), run_id="x")
    assert remote.exit_code == 0 and remote.stages == local.stages
    a, b = _results(local, tmp_path / "a"), _results(remote, tmp_path / "b")
    cols = ["instance", "task", "metric", "scene", "model", "data_config", "value"]
    key = ["instance", "task", "metric", "scene", "model", "data_config"]
    pd.testing.assert_frame_equal(a[cols].sort_values(key).reset_index(drop=True),
                                  b[cols].sort_values(key).reset_index(drop=True))


def test_a_row_that_raises_is_reported_and_fails_the_exit_code(tmp_path, monkeypatch):
    from persrep.generation import cut_paste

    real = cut_paste.CutPasteGenerator.sample

    def sample(self, rows):
        if any(r.instance == "mug_1" and r.index == 2 for r in rows):
            raise RuntimeError("simulated bad row")
        return real(self, rows)

    monkeypatch.setattr(cut_paste.CutPasteGenerator, "sample", sample)
    s = _settings(tmp_path / "root", "generator.types=[cut_paste]", "evaluation.tasks=[classification]")
    summary = run_pipeline(s)
    assert summary.exit_code == 1
    [fail] = summary.failures
    assert fail["stage"] == "synthesis" and fail["unit"].endswith(":mug_1")
    assert fail["error"].startswith("1 of 4 rows failed to generate (synthesis.max_row_errors=0); "
                                    "first: RuntimeError: simulated bad row")
    assert fail["details"]["errors"] == 1 and fail["details"]["kept"] == 3 and fail["attempts"] == 1
    # the unit is not used: mug_1 gets no cut-and-paste adapter; the other instances do
    assert summary.stages["personalization"]["done"] == 3
    assert "mug_1" not in {r["instance"] for r in summary.rows if r["model"] == "personalised"}
    # allowing one row error: the same published unit (not regenerated) is now used
    summary = run_pipeline(s.model_copy(update={"synthesis": s.synthesis.model_copy(update={"max_row_errors": 1})}))
    assert summary.exit_code == 0 and summary.stages["synthesis"]["done"] == 0
    assert summary.stages["synthesis"]["failed"] == 0 and summary.stages["personalization"]["skipped"] == 3
    assert summary.stages["personalization"]["done"] == 1


def test_persrep_run_is_the_run_all_job(capsys):
    """``persrep run`` takes run_all's options and answers bad input the same way (exit 2, one line)."""
    from persrep import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--no-ray" in out and "--storage" in out and out.startswith("usage: persrep run")
    assert cli.main(["run", "--no-ray", "--config", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("persrep run: config 'nope'")
