"""The paper path's known gaps, closed: shared base-model images, dreamsim before compute, paths
resolved on the driver, unit keys without operational settings, GPU-only settings on CPU."""

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from persrep.config import load_settings
from persrep.pipeline import run_pipeline

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.toy.categories=2", "data.toy.instances_per_category=2", "data.toy.image_size=64",
        "data.toy.test_per_scene=1", "data.toy.negatives_per_category=4", "data.toy.dense_per_instance=0",
        "generator.dreambooth.steps=1", "generator.dreambooth.num_class_images=2",
        "synthesis.num_positives=3", "synthesis.num_negatives_per_category=3", "synthesis.inference_steps=2",
        "synthesis.resolution=32", "personalization.max_steps=1", "personalization.batch_size=4",
        "personalization.backbones=[{name: tf_efficientnet_lite0, weights: offline, image_size: 64}]",
        "evaluation.tasks=[classification]", "tracking.enabled=false"]


def _settings(root, *extra):
    return load_settings("local", [*TINY, f"storage.root={root}", *extra])


def _units(root: Path, stage: str) -> set[str]:
    d = root / stage
    return {p.name for p in d.iterdir() if (p / "MANIFEST.json").exists()} if d.exists() else set()


# -- generated backgrounds and class images: keyed units shared by a category's instances ----
def test_generated_backgrounds_and_class_images_are_shared_units(tmp_path):
    root = tmp_path / "root"
    s = _settings(root, "generator.types=[cut_paste, dreambooth]", "generator.cut_paste.backgrounds=generated",
                  "generator.cut_paste.num_backgrounds=3")
    summary = _data_stages(s)
    assert not summary.failures, summary.failures
    # 2 categories x (class images + backgrounds), each drawn once for the category's 2 instances
    assert summary.stages["base_images"]["done"] == 4
    assert summary.stages["generator_prep"]["done"] == 4
    assert not any("row" in str(f) for f in summary.failures)
    assert not list((root / ".scratch").rglob("*.png"))  # no per-instance class-image draws
    shared = _units(root, "base_images")
    assert len(shared) == 4
    import json

    metas = {k: json.loads((root / "base_images" / k / "MANIFEST.json").read_text())["meta"] for k in shared}
    backgrounds = {k: m for k, m in metas.items() if m["kind"] == "backgrounds"}
    assert len({m["category"] for m in backgrounds.values()}) == 2  # one backgrounds unit per category
    assert all(m["count"] == 3 for m in backgrounds.values())
    # every cut-and-paste positive sits on one of its category's published backgrounds:
    # outside the pasted mask its pixels are that background's, byte for byte
    pools = {m["category"]: [np.asarray(Image.open(root / "base_images" / k / f"{i:05d}.png").convert("RGB"))
                              for i in range(3)] for k, m in backgrounds.items()}
    checked = 0
    for key in _units(root, "synthesis"):
        meta = json.loads((root / "synthesis" / key / "MANIFEST.json").read_text())["meta"]
        if meta["generator"] != "cut_paste":
            continue
        category = next(c for c in pools if meta["instance"].startswith(c))
        for part in sorted((root / "synthesis" / key).glob("part-*.parquet")):
            for rec in pq.read_table(part).to_pylist():
                assert rec["error"] is None
                img = np.asarray(Image.open(io.BytesIO(rec["image"])).convert("RGB"))
                outside = np.asarray(Image.open(io.BytesIO(rec["mask"]))) == 0
                assert any((img[outside] == bg[outside]).all() for bg in pools[category])
                checked += 1
    assert checked == 4 * 3
    # a re-run, and a run with one more instance of a category, draw nothing again
    again = _data_stages(s)
    assert again.stages["base_images"]["done"] == 0 and again.stages["base_images"]["skipped"] == 4
    assert again.stages["generator_prep"]["done"] == 0 and not again.failures


def _data_stages(settings):
    """Stages 0-2 (base images, generator prep, synthesis) in-process, as the pipeline runs them."""
    from persrep.pipeline.context import prepare_run
    from persrep.pipeline.executor import LocalExecutor
    from persrep.pipeline.results import RunSummary
    from persrep.pipeline.sequence import run_data_stages

    ctx = prepare_run(settings)
    summary = RunSummary(ctx.run_id)
    run_data_stages(ctx, LocalExecutor(0), summary, lambda _m: None)
    return summary


# -- dreamsim: optional extra, checked before compute -------------------------------------------
def test_dreamsim_checked_before_compute(tmp_path, monkeypatch):
    from persrep.generation.filtering import DREAMSIM_FILES, ScorerUnavailableError, require_scorer

    s = _settings(tmp_path / "root", "synthesis.filter.enabled=true", "synthesis.filter.scorer=dreamsim")
    import importlib.util

    if importlib.util.find_spec("dreamsim") is not None:
        pytest.skip("dreamsim is installed here: the not-installed message cannot be shown")
    with pytest.raises(ScorerUnavailableError) as exc:
        require_scorer(s.synthesis.filter)
    msg = str(exc.value)
    assert "\n" not in msg and "pip install persrep[dreamsim]" in msg and "scorer=embedding" in msg
    # the package present (a stand-in module) but its weights absent: the line names the files
    pkg = tmp_path / "pkgs" / "dreamsim"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    cache = tmp_path / "dscache"
    monkeypatch.setenv("DREAMSIM_CACHE", str(cache))
    with pytest.raises(ScorerUnavailableError) as exc:
        require_scorer(s.synthesis.filter)
    assert "\n" not in str(exc.value) and "ensemble_lora" in str(exc.value) and str(cache) in str(exc.value)
    for f in DREAMSIM_FILES:
        (cache / f).parent.mkdir(parents=True, exist_ok=True)
        (cache / f).write_text("x")
    require_scorer(s.synthesis.filter)  # everything present: passes
    # the offline scorers need nothing
    require_scorer(_settings(tmp_path, "synthesis.filter.enabled=true", "synthesis.filter.scorer=embedding").synthesis.filter)


def test_dreamsim_missing_exits_2_before_any_unit(tmp_path, capsys):
    import importlib.util

    from persrep.distributed.job import main

    if importlib.util.find_spec("dreamsim") is not None:
        pytest.skip("dreamsim is installed here")
    code = main(["--no-ray", "--storage", str(tmp_path / "root"), *TINY, "generator.types=[cut_paste]",
                 "synthesis.filter.enabled=true", "synthesis.filter.scorer=dreamsim"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "dreamsim" in err[0]
    assert not (tmp_path / "root" / "synthesis").exists()


# -- paths resolved once, on the driver -----------------------------------------------------------
def test_relative_paths_resolved_against_the_command_directory(tmp_path, monkeypatch):
    from persrep.pipeline.paths import resolve_settings_paths

    (tmp_path / "negs").mkdir()
    (tmp_path / "sd").mkdir()
    monkeypatch.chdir(tmp_path)
    s = load_settings("local", ["data.path=mydata", "personalization.negatives=external",
                                "personalization.external_negatives=negs", "generator.cut_paste.backgrounds=bg",
                                "storage.root=out", "generator.base_model=./sd",
                                "synthesis.caption_sources=[captions]", "synthesis.captions_file=caps.json"])
    r = resolve_settings_paths(s)
    assert r.data.path == str(tmp_path / "mydata")
    assert r.personalization.external_negatives == str(tmp_path / "negs")
    assert r.generator.cut_paste.backgrounds == str(tmp_path / "bg")
    assert r.synthesis.captions_file == str(tmp_path / "caps.json")
    assert r.storage.root == str(tmp_path / "out")
    assert r.generator.base_model == str(tmp_path / "sd")
    # URIs, @data/ and keywords and hub ids stay; the input settings are not modified
    k = resolve_settings_paths(load_settings("local", ["generator.cut_paste.backgrounds=@data/backgrounds",
                                                      "generator.base_model=runwayml/stable-diffusion-v1-5",
                                                      "storage.root=s3://bucket/x"]))
    assert (k.generator.cut_paste.backgrounds, k.generator.base_model, k.storage.root, k.data.path) == \
        ("@data/backgrounds", "runwayml/stable-diffusion-v1-5", "s3://bucket/x", "toy")
    assert s.personalization.external_negatives == "negs"


@pytest.mark.slow
def test_relative_external_negatives_from_another_directory_on_ray(tmp_path):
    """The job run from a directory that is not the repo root, with relative paths, on Ray: Tune
    runs each trial in its own directory, so a path left relative would fail every trial."""
    work = tmp_path / "elsewhere"
    negs = work / "my_negatives"
    negs.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(negs / f"n{i}.png")
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, str(REPO / "ray_jobs" / "run_all.py"), "--storage", "out", *TINY,
         "data.toy.categories=1", "generator.types=[real_only]", "personalization.negatives=external",
         "personalization.external_negatives=my_negatives", "resources.num_cpus=2", "resources.gpus_per_trial=0"],
        cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FAILED" not in proc.stdout
    assert len(_units(work / "out", "adapters")) == 2


# -- keys hash only what changes a result -----------------------------------------------------
OPERATIONAL = ["personalization.checkpoint_every=7", "evaluation.batch_size=5", "evaluation.evaluate_pretrained=false",
               "resources.max_retries=1", "resources.cpus_per_trial=2", "resources.data_parallel_workers=0",
               "synthesis.batch_size=2", "synthesis.rows_per_shard=5", "generator.dreambooth.gradient_checkpointing=true",
               "tracking.experiment=other",
               "generator.cut_paste.num_backgrounds=5",  # backgrounds from a folder here: no generated pool
               "evaluation.prefix_cache=false", "personalization.channels_last=true"]  # issue #19: how, not what


@pytest.mark.slow
def test_operational_settings_recompute_nothing_result_settings_exactly_their_units(tmp_path):
    root = tmp_path / "root"
    base = ["data.toy.categories=1", "generator.types=[real_only, cut_paste, dreambooth]"]
    first = run_pipeline(_settings(root, *base), run_id="first")
    assert first.exit_code == 0, first.failures
    counts = {st: c["done"] for st, c in first.stages.items()}
    for op in OPERATIONAL:  # each operational setting alone: every unit found, none recomputed
        again = run_pipeline(_settings(root, *base, op), run_id="op")
        assert again.exit_code == 0, (op, again.failures)
        assert all(c["done"] == 0 for c in again.stages.values()), (op, again.stages)
    # a personalisation setting: exactly the adapters and their evaluations, nothing upstream
    changed = run_pipeline(_settings(root, *base, "personalization.temperature=0.1"), run_id="t")
    n_adapters = counts["personalization"]
    assert changed.stages["personalization"]["done"] == n_adapters
    assert changed.stages["evaluation"]["done"] == n_adapters  # the pretrained evaluation is reused
    assert all(changed.stages[st]["done"] == 0 for st in ("base_images", "generator_prep", "synthesis"))
    # a cut-and-paste setting: its synthesis units, their adapters and evaluations only
    cp = run_pipeline(_settings(root, *base, "generator.cut_paste.rotation_degrees=5"), run_id="cp")
    assert cp.stages["synthesis"]["done"] == 2  # the 2 instances' cut-and-paste positives
    assert cp.stages["personalization"]["done"] == 2 and cp.stages["evaluation"]["done"] == 2
    assert cp.stages["generator_prep"]["done"] == 0 and cp.stages["base_images"]["done"] == 0


# -- GPU-only settings on a machine without CUDA --------------------------------------------------
def test_gpu_only_settings_warn_once_each_before_compute(tmp_path):
    from persrep.pipeline.context import cpu_fallback_notes, preflight_models

    s = load_settings("paper", ["generator.dreambooth.use_8bit_adam=true", "generator.dreambooth.mixed_precision=fp16",
                                "synthesis.filter.scorer=embedding"])
    notes = cpu_fallback_notes(s, cuda=False)
    assert len(notes) == 2
    assert "generator.dreambooth.mixed_precision=fp16" in notes[0] and "use_8bit_adam" in notes[1]
    off = load_settings("paper", ["generator.dreambooth.use_8bit_adam=false", "generator.dreambooth.mixed_precision='no'"])
    assert cpu_fallback_notes(off, cuda=False) == []
    local = load_settings("local", ["generator.dreambooth.use_8bit_adam=true", "generator.types=[real_only]"])
    assert cpu_fallback_notes(local, cuda=False) == []  # no DreamBooth: nothing to say
    import torch

    if not torch.cuda.is_available():  # the run's pre-flight says it, once
        run = _settings(tmp_path, "generator.dreambooth.use_8bit_adam=true", "generator.dreambooth.mixed_precision=bf16")
        got = [n for n in preflight_models(run) if n.startswith("WARNING")]
        assert len(got) == 2 and "mixed_precision=bf16" in got[0]
