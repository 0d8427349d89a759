"""The run report: tables hold the right numbers, plots are real images, Chromium renders it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

from persrep.report import HEADLINE, main_report, write_report

BACKBONES = ["vit_small_patch14_dinov2", "tf_efficientnet_lite0"]
INSTANCES = ["mug_01", "mug_02", "shoe_01"]
SCENES = ["in_distribution", "pose", "distractors", "pose_and_distractors"]
CONFIGS = [("dreambooth/cfg4/template", 4.0), ("dreambooth/cfg7.5/template", 7.5)]
SKIP_REASON = "no test_dense masks in this data set"


def _value(rng: np.random.Generator, base: float) -> float:
    return float(np.clip(base + rng.normal(0, 0.05), 0.01, 0.99))


def synthetic_results(leak: bool = False) -> pd.DataFrame:
    """2 backbones x (pretrained + 2 personalised configs) x 4 tasks x 3 instances x scenes.

    The second backbone's segmentation is skipped (with a reason), as a run without dense masks.
    """
    rng = np.random.default_rng(7)
    rows = []
    for b, bb in enumerate(BACKBONES):
        models = [("pretrained", "-", "-", math.nan, "-")] + [
            ("personalised", dc, "dreambooth", cfg, "template") for dc, cfg in CONFIGS]
        for m, (model, dc, gen, cfg, cap) in enumerate(models):
            keys = {"backbone": bb, "model": model, "data_config": dc, "generator": gen, "cfg": cfg,
                    "caption_source": cap, "global_feature": "cls", "adapter_key": "-" if m == 0 else f"k{m}",
                    "negatives_source": "in_pool" if leak else "generated"}
            for inst in INSTANCES:
                base = 0.3 + 0.1 * b + 0.08 * m
                for task, metric in HEADLINE.items():
                    common = {"instance": inst, "category": inst.split("_")[0], "task": task,
                              "status": "ok", "reason": None, **keys}
                    if task == "segmentation" and b == 1:
                        rows.append({**common, "metric": None, "scene": "all", "value": math.nan,
                                     "status": "skipped", "reason": SKIP_REASON})
                        continue
                    rows.append({**common, "metric": metric, "scene": "all", "value": _value(rng, base)})
                    if task == "retrieval":
                        rows.append({**common, "metric": "recall@1", "scene": "all",
                                     "value": _value(rng, base)})
                    if task == "classification":
                        for s, scene in enumerate(SCENES):
                            rows.append({**common, "metric": metric, "scene": scene,
                                         "value": _value(rng, base + 0.3 - 0.1 * s)})
    return pd.DataFrame(rows)


def _cell(values: pd.Series) -> str:
    """Independent formatting of mean ± sample std (x100, one decimal)."""
    v = values.to_numpy(dtype=float)
    return f"{100 * v.mean():.1f} ± {100 * v.std(ddof=1):.1f}"


def _png_ok(path: Path) -> None:
    arr = np.asarray(Image.open(path).convert("RGB"), dtype=float)
    assert arr.shape[0] > 100 and arr.shape[1] > 100, arr.shape
    assert arr.std() > 10, f"{path.name} looks blank (pixel std {arr.std():.1f})"
    assert (arr < 200).any(axis=2).mean() > 0.01, f"{path.name} is nearly all white"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    frame = synthetic_results()
    out = tmp_path_factory.mktemp("report")
    thumbs = []
    for i, color in enumerate([(200, 40, 40), (40, 160, 60), (40, 80, 200), (220, 180, 30)]):
        im = Image.new("RGB", (96, 96), (245, 245, 245))
        ImageDraw.Draw(im).ellipse((10 + 4 * i, 14, 80, 86), fill=color)
        thumbs.append(im)
    path0 = out / "query0.png"
    thumbs[0].save(path0)
    examples = [(thumbs[0], [thumbs[0], thumbs[1], thumbs[2]], [True, False, False]),
                (str(path0), [thumbs[3], thumbs[0]], [False, True])]  # a path is accepted too
    summary = {"run_id": "20261101-120000", "config": "local", "stages": {
        "personalize": {"done": 12, "skipped": 0, "failed": 0}}, "timings": {"total": 12.5},
        "leakage_warning": False}
    html_path = write_report(frame, out, examples=examples, summary=summary)
    return frame, out, html_path


def test_headline_table_numbers(report):
    frame, out, html_path = report
    text = html_path.read_text()
    md = (out / "report.md").read_text()
    ok = frame[(frame.status == "ok") & (frame.scene == "all")]
    checked = 0
    for bb in BACKBONES:
        for model, dc in [("pretrained", "-")] + [("personalised", c) for c, _ in CONFIGS]:
            for task, metric in HEADLINE.items():
                sel = ok[(ok.backbone == bb) & (ok.model == model) & (ok.data_config == dc)
                         & (ok.task == task) & (ok.metric == metric)]
                if sel.empty:
                    continue
                cell = _cell(sel["value"])
                assert cell in text, f"{bb}/{model}/{dc}/{task}: {cell} missing from report.html"
                assert cell in md, f"{bb}/{model}/{dc}/{task}: {cell} missing from report.md"
                checked += 1
    assert checked == 2 * 3 * 4 - 3  # the second backbone has no segmentation
    # a personalised-minus-pretrained delta, computed independently
    sel = ok[(ok.backbone == BACKBONES[0]) & (ok.task == "classification") & (ok.metric == "ap")]
    delta = (sel[sel.data_config == CONFIGS[1][0]]["value"].mean()
             - sel[sel.model == "pretrained"]["value"].mean())
    assert f"{100 * delta:+.1f}" in text
    assert "recall@1" in text  # the all-metrics table keeps the secondary metrics


def test_scene_table_and_skipped(report):
    frame, out, html_path = report
    text = html_path.read_text()
    cls = frame[(frame.task == "classification") & (frame.status == "ok")]
    for scene in SCENES:
        sel = cls[(cls.backbone == BACKBONES[1]) & (cls.model == "pretrained") & (cls.scene == scene)]
        assert _cell(sel["value"]) in text, scene
    assert "pose and distractors" in text
    assert SKIP_REASON in text and SKIP_REASON in (out / "report.md").read_text()
    # the generator x CFG table names both guidance scales
    assert ">7.5</td>" in text and ">4</td>" in text
    assert "Leakage warning" not in text


def test_plots_are_real_images(report):
    _, out, html_path = report
    names = {p.name for p in (out / "plots").glob("*.png")}
    assert names == {"tasks.png", "cfg_curves.png", "scenes.png", "retrieval_examples.png"}
    for p in (out / "plots").glob("*.png"):
        _png_ok(p)
    text = html_path.read_text()
    assert text.count("data:image/png;base64,") == 4  # self-contained
    md = (out / "report.md").read_text()
    for n in names:
        assert f"(plots/{n})" in md and (out / "plots" / n).is_file()


def test_leakage_warning_and_run_dir(tmp_path):
    frame = synthetic_results(leak=True)
    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    frame.to_parquet(run_dir / "results.parquet", index=False)
    (run_dir / "summary.json").write_text(json.dumps({
        "run_id": "r1", "leakage_warning": True, "stages": {}, "timings": {}}))
    (run_dir / "settings.yaml").write_text("name: local\nstorage:\n  s3_endpoint: http://u:hunter2pass@h:9000\n")
    path = main_report(run_dir)
    assert path == run_dir / "report" / "report.html"
    text = path.read_text()
    assert 'class="leak"' in text and "in-pool negatives" in text
    assert "LEAKAGE WARNING" in (path.parent / "report.md").read_text()
    assert "hunter2pass" not in text  # settings are shown redacted
    assert "persrep report: r1" in text
    # only one CFG per config group here would still plot; no examples -> no example grid
    assert not (path.parent / "plots" / "retrieval_examples.png").exists()


def test_single_config_no_scenes(tmp_path):
    frame = synthetic_results()
    frame = frame[(frame.scene == "all") & (frame.data_config.isin(["-", CONFIGS[0][0]]))]
    path = write_report(frame, tmp_path)
    text = path.read_text()
    assert "no scenes" in text
    assert not (tmp_path / "plots" / "cfg_curves.png").exists()  # a single CFG: no curve
    assert (tmp_path / "plots" / "tasks.png").exists()


def test_missing_results_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="results.parquet"):
        write_report(tmp_path, tmp_path / "out")


from browser import CHROMIUM, screenshot  # noqa: E402


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    _, _, html_path = report
    arr = screenshot(html_path.resolve().as_uri(), tmp_path / "shot.png", tmp_path / "profile", 1280, 2000)
    assert arr.shape[:2] == (2000, 1280)
    assert arr.std() > 15, f"screenshot looks blank (std {arr.std():.1f})"
    assert (arr.min(axis=2) < 230).mean() > 0.05, "screenshot is nearly all white"
    # the header band (dark blue) really rendered at the top
    assert arr[5:40, :, 2].mean() > arr[5:40, :, 0].mean() + 20
