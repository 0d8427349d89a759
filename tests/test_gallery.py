"""Report galleries from a real (tiny) run: thumbnails, examples and compute-vs-quality are right,
the page stays light for 100 instances, and headless Chromium shows the images."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from persrep.config import load_settings
from persrep.evaluation.examples import pack_mask, unpack_mask
from persrep.pipeline import run_pipeline
from persrep.report import write_report
from persrep.storage import Storage

pytestmark = pytest.mark.slow

SMALL = ["data.toy.categories=2", "data.toy.instances_per_category=2", "data.toy.image_size=64",
         "data.toy.test_per_scene=1", "data.toy.negatives_per_category=4", "data.max_instances=2",
         "generator.types=[real_only, cut_paste]", "synthesis.num_positives=4", "synthesis.resolution=32",
         "personalization.max_steps=2", "personalization.batch_size=4",
         "personalization.backbones=[{name: tf_efficientnet_lite0, weights: offline, image_size: 64}]",
         "evaluation.dense_input_size=64", "tracking.enabled=false"]
from browser import CHROMIUM, screenshot  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gallery") / "root"
    summary = run_pipeline(load_settings("local", [*SMALL, f"storage.root={root}"]), run_id="g")
    assert summary.exit_code == 0, summary.failures
    run_dir = root / "runs" / "g"
    return root, run_dir, run_dir / "report" / "report.html"


def _gallery_part(page: str) -> str:
    return page[page.index("<h2>Instances"):page.index("<h2 id=\"run-details\"")]


def test_every_instance_has_a_closed_section_of_lazy_small_thumbnails(run):
    root, run_dir, html_path = run
    page = html_path.read_text()
    gal = _gallery_part(page)
    frame = pd.read_parquet(run_dir / "results.parquet")
    instances = sorted(frame["instance"].unique())
    blocks = re.findall(r'<details class="inst gal"( open)?><summary>(\S+) ', gal)
    assert [b[1] for b in blocks] == instances and not any(b[0] for b in blocks)  # all collapsed
    imgs = re.findall(r"<img [^>]*>", gal)
    assert imgs and all('loading="lazy"' in i for i in imgs)
    assert "data:image" not in gal  # thumbnails are files, never inlined
    srcs = [re.search(r'src="([^"]+)"', i)[1] for i in imgs]
    assert all(re.fullmatch(r"thumbs/[0-9a-f]{20}\.jpg", s) for s in srcs)
    for s in set(srcs):
        p = html_path.parent / s
        with Image.open(p) as im:
            assert im.format == "JPEG" and max(im.size) <= 128
        assert p.stat().st_size < 20_000
    per_instance = len(gal) / len(instances)
    assert per_instance < 20_000, f"{per_instance:.0f} bytes of HTML per instance"
    for name in instances:  # 3 training photos, positives of cut_paste, negatives, both tasks
        block = gal[gal.index(f"<summary>{name} "):]
        block = block[:block.index("</details>")]
        assert block.count('alt="0.png"') + block.count('alt="1.png"') + block.count('alt="2.png"') == 3
        for heading in ("Training photos (mask outlined)", "Synthetic positives", "Negatives",
                        "Retrieval", "Detection / segmentation"):
            assert heading in block, (name, heading)
        assert "cut_paste (4 rows)" in block and "pretrained: " in block and "real_only: " in block


def test_train_thumbnails_outline_the_mask(run):
    root, run_dir, html_path = run
    gal = _gallery_part(html_path.read_text())
    src = re.search(r'src="(thumbs/[^"]+)" alt="0.png"', gal)[1]
    arr = np.asarray(Image.open(html_path.parent / src).convert("RGB")).astype(int)
    orange = (np.abs(arr - np.array([232, 113, 10])).sum(axis=2) < 120)
    assert orange.sum() > 40, "no mask outline drawn"
    # an outline, not a filled mask: a thin ring
    assert orange.mean() < 0.25


def test_examples_are_honest(run):
    """The gallery's evaluation examples agree with the data set: hits are marked correct exactly
    when they show the instance, ground-truth boxes are the masks' extents, IoU is in range."""
    root, run_dir, _ = run
    st = Storage(str(root))
    units = json.loads((run_dir / "units.json").read_text())
    evals = [u for u in units if u["stage"] == "evaluation"]
    assert len(evals) == 1 + 2 * 2  # pretrained + (2 configs x 2 instances)
    data = Path(json.loads((run_dir / "summary.json").read_text())["data"])
    for u in evals:
        doc = json.loads(st.read_unit_file("evaluations", u["key"], "examples.json"))
        assert doc["keys"]["model"] in ("pretrained", "personalised")
        for inst, ex in doc["instances"].items():
            assert ex["retrieval"], inst
            for q in ex["retrieval"]:
                assert q["query"].startswith(f"test/{inst}/") and len(q["hits"]) == 5
                assert q["correct"] == [h.split("/")[1] == inst for h in q["hits"]]
                assert q["scores"] == sorted(q["scores"], reverse=True)
            assert ex["dense"], inst
            for d in ex["dense"]:
                mask_rel = d["image"].replace("test_dense/", "test_dense_masks/", 1)
                gt = np.asarray(Image.open(data / mask_rel).convert("L")) > 0
                ys, xs = np.nonzero(gt)
                assert d["gt_box"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
                assert 0.0 <= d["iou"] <= 1.0
                assert unpack_mask(d["pred_mask"]).shape == tuple(d["pred_mask"]["shape"])


def test_pack_mask_round_trip():
    rng = np.random.default_rng(0)
    m = rng.random((40, 30)) > 0.5
    assert (unpack_mask(pack_mask(m, side=64)) == m).all()  # smaller than side: exact
    big = np.zeros((256, 128), bool)
    big[64:192, 32:96] = True
    small = unpack_mask(pack_mask(big, side=64))
    assert small.shape == (64, 32) and small.mean() == pytest.approx(big.mean(), abs=0.02)


def test_compute_vs_quality_reads_the_units_seconds(run):
    from persrep.report.compute import compute_frame

    root, run_dir, html_path = run
    st = Storage(str(root))
    units = json.loads((run_dir / "units.json").read_text())
    frame = pd.read_parquet(run_dir / "results.parquet")
    table = compute_frame(units, st, frame).set_index("data_config")
    assert set(table.index) == {"real_only", "cut_paste"}
    assert table.loc["real_only", "seconds_generate"] == 0.0
    # independent: the manifests' seconds, averaged by hand
    syn = [st.manifest("synthesis", u["key"]).meta["seconds"] for u in units
           if u["stage"] == "synthesis" and u["label"].startswith("pos:")]
    assert table.loc["cut_paste", "seconds_generate"] == pytest.approx(np.mean(syn))
    pz = [st.manifest("adapters", u["key"]).meta["seconds"] for u in units
          if u["stage"] == "personalization" and u["label"].startswith("cut_paste:")]
    assert table.loc["cut_paste", "seconds_train"] == pytest.approx(np.mean(pz))
    pre = frame[(frame.model == "pretrained") & (frame.task == "retrieval") & (frame.metric == "ndcg")
                & (frame.scene == "all")].set_index("instance")["value"]
    per = frame[(frame.data_config == "cut_paste") & (frame.task == "retrieval") & (frame.metric == "ndcg")
                & (frame.scene == "all")].set_index("instance")["value"]
    assert table.loc["cut_paste", "gain_retrieval"] == pytest.approx(100 * (per - pre[per.index]).mean())
    assert (html_path.parent / "plots" / "compute_quality.png").is_file()
    assert "(d) Compute vs quality" in html_path.read_text()


def test_rewriting_the_report_reuses_thumbnails(run):
    root, run_dir, html_path = run
    thumbs = sorted((html_path.parent / "thumbs").iterdir())
    mtimes = [p.stat().st_mtime_ns for p in thumbs]
    write_report(run_dir, html_path.parent)
    assert sorted((html_path.parent / "thumbs").iterdir()) == thumbs
    assert [p.stat().st_mtime_ns for p in thumbs] == mtimes


def _chromium(url: str, shot: Path, profile: Path) -> None:
    screenshot(url, shot, profile, 1280, 2400,
               ("--virtual-time-budget=10000",))  # lazy thumbnails in view load before the shot


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")
def test_galleries_render_in_chromium_for_100_instances(run, tmp_path):
    """A page with 100 instance sections (the run's sections repeated) opens in Chromium; with the
    first section opened the screenshot shows its thumbnails (coloured frames of the retrieval
    rows), and the HTML of 100 collapsed sections stays small."""
    root, run_dir, html_path = run
    page = html_path.read_text()
    start, end = page.index("<h2>Instances"), page.index("<h2 id=\"run-details\"")
    blocks = re.findall(r'<details class="inst gal">.*?</details>', page[start:end], re.S)
    many = "".join(blocks[i % len(blocks)] for i in range(100))
    many = many.replace('<details class="inst gal">', '<details class="inst gal" open>', 1)
    body = page[:page.index("<main>") + 6] + "<h2>Instances (100)</h2>" + many + "</main></body></html>"
    out = html_path.parent / "many.html"
    out.write_text(body)
    assert len(many.encode()) < 2_000_000  # 100 sections: links to thumbnails, no pixels
    shot = tmp_path / "gallery.png"
    _chromium(out.resolve().as_uri(), shot, tmp_path / "profile")
    arr = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert arr.std() > 15
    green = (np.abs(arr - np.array([24, 128, 56])).sum(axis=2) < 60).sum()
    red = (np.abs(arr - np.array([217, 48, 37])).sum(axis=2) < 60).sum()
    assert green > 200 and red > 200, (green, red)  # retrieval frames drawn in the thumbnails
    keep = os.environ.get("PERSREP_KEEP_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / "gallery.png")


# ---------------------------------------------------------------------------------------------
# a run that predicted its train masks (generator.auto_masks): uncertain masks folded into one
# note with their thumbnails, the confidence in the per-instance table, outlines in the galleries
AUTO = ["data.toy.categories=2", "data.toy.instances_per_category=1", "data.toy.image_size=64",
        "generator.types=[cut_paste]", "synthesis.num_positives=4", "synthesis.resolution=64",
        "generator.cut_paste.backgrounds=@data/backgrounds", "personalization.negatives=external",
        "personalization.external_negatives=@data/negatives", "personalization.max_steps=2",
        "personalization.batch_size=4",
        "personalization.backbones=[{name: tf_efficientnet_lite0, weights: offline, image_size: 64}]",
        "evaluation.tasks=[classification, retrieval]", "tracking.enabled=false", "segmentation.init=box",
        "generator.auto_masks=true", "segmentation.min_confidence=1.0"]  # every mask is 'uncertain'


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory):
    from persrep.data.toy import write_toy_dataset

    base = tmp_path_factory.mktemp("auto")
    data = base / "plain"
    write_toy_dataset(data, categories=2, instances_per_category=1, image_size=64, test_per_scene=1,
                      dense_per_instance=0, negatives_per_category=4)
    shutil.rmtree(data / "train_masks")
    if not (data / "backgrounds").exists():  # cut-and-paste backgrounds: the toy's negatives photos
        shutil.copytree(next(p for p in (data / "negatives").iterdir() if p.is_dir()), data / "backgrounds")
    root = base / "root"
    summary = run_pipeline(load_settings("local", [*AUTO, f"data.path={data}", f"storage.root={root}"]),
                           run_id="auto")
    assert summary.exit_code == 0, summary.failures
    run_dir = root / "runs" / "auto"
    return root, run_dir, run_dir / "report" / "report.html"


def test_uncertain_auto_masks_are_one_note_with_their_thumbnails(auto_run):
    root, run_dir, html_path = auto_run
    page = html_path.read_text()
    first = page[:page.index('id="run-details"')]
    units = [u for u in json.loads((run_dir / "units.json").read_text()) if u["stage"] == "auto_masks"]
    st = Storage(str(root))
    conf = {u["label"].split(":", 1)[1]: st.manifest("masks", u["key"]).meta["confidence"] for u in units}
    assert sorted(conf) == sorted(pd.read_parquet(run_dir / "results.parquet")["instance"].unique())
    notes = json.loads((run_dir / "summary.json").read_text())["notes"]
    assert sum(n.startswith("auto masks of ") for n in notes) == len(conf)  # one note per instance in the run
    assert first.count("auto masks of ") == 0 and first.count('<details class="note fold">') == 1
    note = first[first.index('<details class="note fold">'):]
    note = note[:note.index("</details>")]
    assert f"The automatic masks of {len(conf)} instances are uncertain (confidence below 1)" in note
    for u in units:
        assert u["key"] not in first  # never the hashed folders
    for inst, cs in conf.items():
        assert f"{inst}: #0, #1, #2" in note
        for i, c in enumerate(cs):
            assert f"#{i} · auto mask {c:.2f}" in note
    srcs = re.findall(r'src="(thumbs/[0-9a-f]{20}\.jpg)"', note)
    assert len(srcs) == 3 * len(conf)
    arr = np.asarray(Image.open(html_path.parent / srcs[0]).convert("RGB")).astype(int)
    orange = np.abs(arr - np.array([232, 113, 10])).sum(axis=2) < 120
    assert orange.sum() > 40 and orange.mean() < 0.25  # the mask outlined, not filled
    # the per-instance table: the lowest confidence of each instance's masks, flagged
    table = first[first.index('class="inst-table"'):]
    for inst, cs in conf.items():
        row = table[table.index(f"<td>{inst}</td>"):]
        row = row[:row.index("</tr>")]
        assert f"{min(cs):.2f} ⚠" in row
    # the galleries outline the automatic masks on the training photos too
    gal = _gallery_part(page)
    assert gal.count("Training photos (mask outlined)") == len(conf)
    # one data configuration: (b) and (d) would hold one point each, and are left out
    assert "(b) Generator" not in page and "(d) Compute vs quality" not in page
    assert not (html_path.parent / "plots" / "compute_quality.png").exists()
