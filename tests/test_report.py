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
        "run_id": "r1", "data": str(tmp_path / "datasets" / "toy-0123abcd"), "leakage_warning": True,
        "stages": {}, "timings": {}}))
    (run_dir / "settings.yaml").write_text("name: local\nstorage:\n  s3_endpoint: http://u:hunter2pass@h:9000\n")
    path = main_report(run_dir)
    assert path == run_dir / "report" / "report.html"
    text = path.read_text()
    assert 'class="leak"' in text and "in-pool negatives" in text
    assert "LEAKAGE WARNING" in (path.parent / "report.md").read_text()
    assert "hunter2pass" not in text  # settings are shown redacted
    assert "<h1>toy world: 3 instances personalised with 2 data configurations (run r1)</h1>" in text
    # only one CFG per config group here would still plot; no examples -> no example grid
    assert not (path.parent / "plots" / "retrieval_examples.png").exists()


def test_single_config_no_scenes(tmp_path):
    """A one-configuration run without scenes: (b), (c) and (d) would be empty or one point each,
    so they are left out (headings and plots), in both the page and its Markdown twin."""
    frame = synthetic_results()
    frame = frame[(frame.scene == "all") & (frame.data_config.isin(["-", CONFIGS[0][0]]))]
    path = write_report(frame, tmp_path)
    text, md = path.read_text(), (tmp_path / "report.md").read_text()
    for heading in ("(b) Generator", "(c) Classification AP per test scene", "(d) Compute vs quality"):
        assert heading not in text and heading not in md, heading
    assert not (tmp_path / "plots" / "cfg_curves.png").exists()  # a single CFG: no curve
    assert not (tmp_path / "plots" / "scenes.png").exists()
    assert (tmp_path / "plots" / "tasks.png").exists()
    assert "<h2>(a) Pretrained vs personalised" in text and 'id="per-instance"' in text


def test_sections_a_multi_configuration_run_fills_stay(report):
    _, out, html_path = report
    text = html_path.read_text()
    assert "<h2>(b) Generator" in text and "<h2>(c) Classification AP per test scene" in text


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


# ---------------------------------------------------------------------------------------------
# the first screen: verdict, per-instance table, folded warnings, no paths or jargon in titles
BB = "vit_small_patch14_dinov2"
# instance -> (classification AP pretrained, personalised), (retrieval NDCG pretrained, personalised)
HAND = {"apple": ((0.50, 0.60), (0.40, 0.50)),    # gain +10.0
        "banana": ((0.70, 0.65), (0.80, 0.80)),   # gain -2.5
        "cherry": ((0.30, 0.45), (0.60, 0.70)),   # gain +12.5
        "durian": ((0.50, None), (0.50, None))}   # its adapter failed: pretrained only
KEY_HEX = "a48a9495845d3d95"


def hand_results(model_used: bool = False) -> pd.DataFrame:
    rows = []
    for inst, per_task in HAND.items():
        for (task, metric), (pre, per) in zip([("classification", "ap"), ("retrieval", "ndcg")], per_task):
            common = {"instance": inst, "category": "fruit", "task": task, "metric": metric, "scene": "all",
                      "status": "ok", "reason": None, "backbone": BB}
            rows.append({**common, "model": "pretrained", "data_config": "-", "value": pre,
                         "positives_used": "-", "n_positives": 0})
            if per is not None:
                extra = {"model_used": "pretrained" if inst == "banana" else "adapter",
                         "model_reason": "the adapter scored below the pretrained model on held-out photos"
                         if inst == "banana" else ""} if model_used else {}
                rows.append({**common, "model": "personalised", "data_config": "cut_paste", "generator": "cut_paste",
                             "value": per, "positives_used": "synthetic", "n_positives": 96, **extra})
        for task in ("detection", "segmentation"):
            rows.append({"instance": inst, "category": "fruit", "task": task, "metric": None, "scene": "all",
                         "status": "skipped", "reason": "no dense pool supplied (dense features of the test images)",
                         "backbone": BB, "model": "pretrained", "data_config": "-", "value": math.nan})
    return pd.DataFrame(rows)


HAND_NOTES = (["backbone vit_small_patch14_dinov2: weights offline",
               "auto masks: segmenter grabcut: no weights needed",
               "synthesis: 372 rows, 0 row errors, 62 generator loads on 2 actor(s)"]
              + [f"auto masks of {i}: train image(s) [0, 2] have confidence < 0.5 (masks/{KEY_HEX}/); "
                 "check them or give train_masks/ (persrep data masks)" for i in ("apple", "banana", "cherry")]
              + [f"data warning: test/apple/{k}.png: unreadable image" for k in (3, 7, 11)]
              + ["WARNING: generator.dreambooth.use_8bit_adam needs CUDA"])


def hand_run(tmp_path: Path, model_used: bool = False) -> Path:
    run_dir = tmp_path / "store" / "runs" / "20261206-173500"
    run_dir.mkdir(parents=True)
    hand_results(model_used).to_parquet(run_dir / "results.parquet", index=False)
    costs = {"auto_masks": {"stage_seconds": 8.0, "unit_types": {"masks": {"units_run": 4, "skipped": 0}}},
             "synthesis": {"stage_seconds": 12.0, "unit_types": {"pos": {"units_run": 4, "skipped": 0}}},
             "personalization": {"stage_seconds": 60.0, "unit_types": {"cut_paste": {"units_run": 3, "failed": 1}}},
             "evaluation": {"stage_seconds": 20.0, "unit_types": {"adapter": {"units_run": 3, "skipped": 1}}}}
    (run_dir / "summary.json").write_text(json.dumps({
        "run_id": "20261206-173500", "config": "local", "data": str(tmp_path / "data" / "grocery_produce"),
        "instances": 4, "stages": {"auto_masks": {"done": 4}}, "timings": {"total": 101.0}, "costs": costs,
        "notes": HAND_NOTES + [f"data warning: WARNING {tmp_path / 'data' / 'grocery_produce'}: dense tasks "
                               "asked but test images lack masks -> detection/segmentation will be skipped"],
        "failures": [{"stage": "personalization", "unit": f"cut_paste:{BB}:durian",
                      "error": "RuntimeError: CUDA out of memory", "attempts": 1}]}))
    return run_dir


def _first_part(text: str) -> str:
    return text[:text.index('id="run-details"')]


def test_verdict_numbers_are_the_hand_computed_ones(tmp_path):
    """Classification: 2 of 3 improved (apple, cherry; banana worse), AP 50.0 -> 56.7, mean of the
    differences (+10 - 5 + 15) / 3 = +6.7; retrieval: 2 of 3 (banana unchanged), NDCG 60.0 -> 66.7,
    +6.7. Cost: (8 + 12 + 60 + 20) s / 4 instances = 25 s, of which making the training data
    (masks + synthesis) 5.0 s, training 15 s, evaluating 5.0 s; one unit reused."""
    path = main_report(hand_run(tmp_path), tmp_path / "out")
    text, md = path.read_text(), (path.parent / "report.md").read_text()
    lead = ("Personalisation improved 2 of 3 instances on classification (1 worse; AP +6.7 points on average) "
            "and 2 of 3 on retrieval (NDCG +6.7), at 25 s per instance.")
    cls = "classification: 2 of 3 instances improved, 1 got worse; AP 50.0 → 56.7 (+6.7 points on average)"
    ret = "retrieval: 2 of 3 instances improved; NDCG 60.0 → 66.7 (+6.7 points on average)"
    cost = ("Cost: 25 s per instance of wall time (100 s for 4 instances: making training data 5.0 s, "
            "training 15 s, evaluating 5.0 s per instance); 1 unit was reused from earlier runs and cost "
            "nothing here.")
    failed = "1 of 4 instances have no personalised result"
    for line in (lead, cls, ret, cost, failed, "Not measured: detection, segmentation"):
        assert line in text, line
        assert line in md, line
    # (a)'s coloured differences pair the instances too: durian (pretrained only) is left out, so
    # retrieval reads +6.7, not 66.7 - 57.5 = +9.2 (the pretrained mean over all 4)
    table_a = text[text.index("<h2>(a)"):text.index("Warnings")]
    assert "57.5 ± 17.1" in table_a and table_a.count('<span class="delta pos">+6.7</span>') == 2
    assert "+9.2" not in table_a
    verdict = text[text.index('<section class="verdict">'):text.index("</section>")]
    assert lead in verdict and cost in verdict
    # the verdict and the headline table come first, before the warnings and the per-instance table
    assert text.index('class="verdict"') < text.index("<h2>(a)") < text.index("Warnings") < text.index('id="per-instance"')


def _instance_rows(text: str) -> list[list[str]]:
    import re

    table = text[text.index('class="inst-table"'):]
    table = table[:table.index("</table>")]
    body = table[table.index("<tbody>"):]
    return [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in re.findall(r"<tr[^>]*>(.*?)</tr>", body)]


def test_per_instance_table_is_sorted_by_gain_with_failures_last(tmp_path):
    path = main_report(hand_run(tmp_path), tmp_path / "out")
    text, md = path.read_text(), (path.parent / "report.md").read_text()
    rows = _instance_rows(text)
    assert [r[0] for r in rows] == ["cherry", "apple", "banana", "durian"]
    cherry = rows[0]
    # instance, category, positives, AP pre / pers / delta, NDCG pre / pers / delta, gain, note
    assert cherry[:3] == ["cherry", "fruit", "96 synthetic"]
    assert [c.split(">")[-2].split("<")[0] if "<" in c else c for c in cherry[3:10]] == [
        "30.0", "45.0", "+15.0", "60.0", "70.0", "+10.0", "+12.5"]
    assert "–" in rows[3][4] and "personalization: RuntimeError: CUDA out of memory" in rows[3][-1]
    assert "model used" not in text  # the safety net's columns only when the results carry them
    md_rows = [line for line in md.splitlines() if line.startswith("| ") and "fruit" in line]
    assert [r.split(" | ")[0][2:] for r in md_rows] == ["cherry", "apple", "banana", "durian"]


def test_model_used_and_reason_are_shown_when_present(tmp_path):
    path = main_report(hand_run(tmp_path, model_used=True), tmp_path / "out")
    text = path.read_text()
    assert "<th rowspan=\"2\">model used</th>" in text and "<th rowspan=\"2\">why</th>" in text
    banana = next(r for r in _instance_rows(text) if r[0] == "banana")
    assert "pretrained" in banana and any("held-out photos" in c for c in banana)
    assert "The pretrained model was kept for 1 of 3 personalised instances" in text
    durian = next(r for r in _instance_rows(text) if r[0] == "durian")  # a failure reads in 'why'
    assert "personalization: RuntimeError: CUDA out of memory" in durian[-1]


def test_one_model_for_every_instance_is_said_once_not_per_row(tmp_path):
    run = hand_run(tmp_path)
    df = pd.read_parquet(run / "results.parquet")
    df.loc[df["model"] == "personalised", "model_used"] = "adapter + pretrained (share 0.25)"
    df.to_parquet(run / "results.parquet", index=False)
    path = main_report(run, tmp_path / "out")
    text, md = path.read_text(), (path.parent / "report.md").read_text()
    assert "<th rowspan=\"2\">model used</th>" not in text
    assert text.count("adapter + pretrained (share 0.25)") == 1
    assert "model used for every instance: adapter + pretrained (share 0.25)" in text
    assert "model used for every instance: adapter + pretrained (share 0.25)" in md
    assert all(len(r) == len(_instance_rows(text)[0]) for r in _instance_rows(text))


def test_repeated_warnings_are_folded_and_details_go_to_the_end(tmp_path):
    path = main_report(hand_run(tmp_path), tmp_path / "out")
    text, md = path.read_text(), (path.parent / "report.md").read_text()
    first = _first_part(text)
    # 3 low-confidence mask notes -> one expandable note naming the instances, not the hashed folder
    assert first.count('<details class="note fold">') == 2  # the masks, and the 3 unreadable images
    masks = first[first.index("The automatic masks of 3 instances are uncertain (confidence below 0.5)"):]
    masks = masks[:masks.index("</details>")]
    for inst in ("apple", "banana", "cherry"):
        assert f"{inst}: train images #0, #2" in masks
    assert KEY_HEX not in text and KEY_HEX not in md
    assert "3 similar warnings: data warning: test/apple/3.png: unreadable image" in first
    assert first.count('<div class="note">') == 2 and "use_8bit_adam needs CUDA" in first  # single ones stay
    assert "data warning: WARNING …/grocery_produce: dense tasks asked" in first  # no machine path up front
    # informational notes and internal terms: only in the folded run details at the end
    for jargon in ("generator loads", "dense pool supplied", "weights offline", "segmenter grabcut"):
        assert jargon not in first, jargon
        assert jargon in text[text.index('id="run-details"'):], jargon
    assert text.index('id="run-details"') > text.index('id="per-instance"')
    assert '<details class="run">' in text


def test_titles_name_the_data_set_and_run_in_words_without_machine_paths(tmp_path):
    import re

    run_dir = hand_run(tmp_path)
    path = main_report(run_dir, tmp_path / "out")
    text, md = path.read_text(), (path.parent / "report.md").read_text()
    title = re.search(r"<title>(.*?)</title>", text)[1]
    h1 = re.search(r"<h1>(.*?)</h1>", text)[1]
    assert title == h1 == ("grocery produce: 4 instances personalised with cut-and-paste composites "
                           "from automatic masks (run 20261206-173500)")
    assert md.startswith(f"# {title}\n")
    titles = re.findall(r"<(?:title|h1|h2|h3|summary)[^>]*>(.*?)</(?:title|h1|h2|h3|summary)>", text)
    titles.append(re.search(r'<div class="meta">(.*?)</div>', text)[1])
    for t in titles:
        assert str(tmp_path) not in t and not re.search(r"(^|\s)/(tmp|home|root|work|Users)/", t), t
    assert str(tmp_path) not in _first_part(text)  # paths only in the run details
    assert str(tmp_path / "data" / "grocery_produce") in text[text.index('id="run-details"'):]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")
def test_first_screen_renders_the_verdict_in_headless_chromium(tmp_path):
    """The first screen (1280 x 900) shows the header, the verdict box (its dark left border and
    white body) and the headline table; PERSREP_KEEP_SCREENSHOTS=DIR keeps the PNG."""
    import os
    import shutil

    path = main_report(hand_run(tmp_path), tmp_path / "out")
    shot = tmp_path / "first_screen.png"
    arr = screenshot(path.resolve().as_uri(), shot, tmp_path / "profile", 1280, 900)
    assert arr.shape[:2] == (900, 1280)
    assert arr[5:40, :, 2].mean() > arr[5:40, :, 0].mean() + 20  # the dark blue header band
    # the verdict box: a dark (#1f3b63) left border column and a white body, below the header
    rows = np.flatnonzero((np.abs(arr[:, :, :] - np.array([31, 59, 99])).sum(axis=2) < 40)[:, 40:70].any(axis=1))
    border = rows[rows > 150]
    assert len(border) > 80, "no verdict box border on the first screen"
    body = arr[border.min():border.max(), 200:1100]
    assert (body.min(axis=2) > 250).mean() > 0.6, "the verdict box is not a white panel"
    assert (body.max(axis=2) < 120).mean() > 0.005, "no text in the verdict box"
    keep = os.environ.get("PERSREP_KEEP_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / "report_first_screen.png")


def test_mask_column_says_which_instances_got_a_box_fallback():
    """The per-instance table's mask cell: the lowest confidence, marked below the threshold, and how
    many train photos got the labelled centred box (auto masks found nothing there)."""
    from persrep.report.sections import instance_section
    from persrep.report.verdict import instance_table

    frame = hand_results()
    table = instance_table(frame, {"apple": 0.9, "banana": 0.0, "cherry": 0.3}, {"banana": 2})
    assert dict(zip(table["instance"], table["mask_boxes"])) == {"cherry": 0, "apple": 0, "banana": 2, "durian": 0}
    html_parts, md_parts = instance_section(table, threshold=0.5, failures={}, one_backbone=True)
    text, md = "".join(html_parts), "\n".join(md_parts)
    rows = {r[0]: r for r in _instance_rows(text)}
    assert rows["banana"][-2] == "0.00 · 2 box ⚠" and rows["apple"][-2] == "0.90" and rows["cherry"][-2] == "0.30 ⚠"
    assert "2 of the train photos got a centred box" in text and "0.00 · 2 box ⚠" in md


def test_notes_that_differ_in_a_hyphenated_name_or_an_index_list_fold_together():
    from persrep.report.notes import sort_notes

    names = ["Red-Beet", "Beet", "Regular-Tomato", "Asparagus"]
    box = "auto masks of {}: no object found in train image(s) {}, a centred box stands in; give train_masks/"
    notes = [box.format("Asparagus", "[2]"), box.format("Red-Beet", "[1]"),
             box.format("Regular-Tomato", "[0, 2]"), "use_8bit_adam needs CUDA"]
    groups, details = sort_notes(notes, names)
    assert [g.kind for g in groups] == ["repeated", "single"] and not details
    assert groups[0].summary.startswith("3 similar warnings: auto masks of Asparagus")
    assert groups[0].items == notes[:3]
    # a name inside a longer hyphenated name is not that instance: "Beet" != "Red-Beet"
    groups, _ = sort_notes([box.format("Red-Beet", "[1]"), box.format("Red-Beet", "[1]").replace("Red-Beet", "Red-Beetroot")],
                           names)
    assert [g.kind for g in groups] == ["single", "single"]
