"""``persrep find``: a finished tiny run searched for in photo collections (local and s3://),
corrupt files, the calibration rule, the embedding cache (resume), a killed Ray actor, the
gallery in headless Chromium, MLflow, and bad input."""

from __future__ import annotations

import functools
import io
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from persrep.config import load_settings
from persrep.find.job import FindOptions, LocalRunner, run_find

TINY = ["data.toy.categories=2", "data.toy.instances_per_category=2", "data.toy.image_size=64",
        "data.toy.test_per_scene=2", "data.toy.negatives_per_category=6",
        "generator.types=[cut_paste]", "synthesis.num_positives=6",
        "personalization.max_steps=3", "personalization.batch_size=4",
        "personalization.backbones=[{name: tf_efficientnet_lite0, weights: offline, image_size: 64}]",
        "evaluation.tasks=[classification]", "evaluation.dense_input_size=64"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One finished tiny run (4 instances, cut-and-paste adapters) for the whole module."""
    from persrep.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("find") / "root"
    summary = run_pipeline(load_settings("local", [*TINY, f"storage.root={root}"]), run_id="toy")
    assert summary.exit_code == 0, summary.failures
    return root, root / "runs" / "toy"


def _dataset(run_dir: Path) -> Path:
    return Path(json.loads((run_dir / "summary.json").read_text())["data"])


def _collection(run_dir: Path, dest: Path) -> Path:
    """The run's evaluation pool (labelled by folder) plus files that must be skipped."""
    shutil.copytree(_dataset(run_dir) / "test", dest)
    (dest / "bottle_0" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    png = io.BytesIO()
    Image.new("RGB", (40, 40), (10, 200, 30)).save(png, format="PNG")
    (dest / "nested" / "deeper").mkdir(parents=True)
    (dest / "nested" / "deeper" / "truncated.png").write_bytes(png.getvalue()[:60])
    (dest / "nested" / "empty.webp").write_bytes(b"")
    (dest / "notes.txt").write_text("not a photo")
    (dest / ".hidden.jpg").write_bytes(b"hidden")
    return dest


BAD = {"bottle_0/corrupt.jpg", "nested/deeper/truncated.png", "nested/empty.webp"}


# -- calibration rule (fast: synthetic collections with a known truth) ------------------------------
def _synthetic(rng, n=2000, k=6, share=0.04):
    """``n`` photos, ``k`` instances, each present in ``share`` of the photos (at most one per photo),
    the rest show none of them. Background scores ~ N(0.45, 0.06) under every instance's model; a
    photo of instance c scores ~ N(0.78, 0.04) for c, so it is c's rival for every other instance."""
    owner = np.full(n, -1)
    per = int(share * n)
    idx = rng.permutation(n)
    for c in range(k):
        owner[idx[c * per:(c + 1) * per]] = c
    S = rng.normal(0.45, 0.06, (n, k))
    for c in range(k):
        S[owner == c, c] = rng.normal(0.78, 0.04, per)
    R = np.stack([np.delete(S, c, axis=1).max(axis=1) for c in range(k)], axis=1)
    return owner, S, R


def test_thresholds_land_between_the_two_score_populations():
    from persrep.find.calibrate import decide

    rng = np.random.default_rng(0)
    owner, S, R = _synthetic(rng, share=0.13)  # 6 x 13 % of the photos show an instance, 22 % none
    for c in range(S.shape[1]):
        d = decide(S[:, c], R[:, c])
        pos, neg = S[owner == c, c], S[owner != c, c]
        # the background fit is not moved by the 13 % positives: it lands on the negatives' bulk
        assert d.background.median == pytest.approx(np.median(neg), abs=0.02)
        assert d.background.scale == pytest.approx(neg.std(), rel=0.25)
        # both thresholds sit above the negatives' bulk and below every positive
        assert np.median(neg) < d.possible_threshold < d.likely_threshold < pos.min()
        assert d.likely_threshold > np.quantile(neg, 0.95)
        truth = owner == c
        hit = d.tier != ""
        assert hit[truth].all() and (d.tier[truth] == "likely").mean() > 0.99
        # photos of the other instances never win (their own instance's references are closer);
        # photos of nothing win against noise only, and must also stand out (z >= 1)
        assert not hit[(owner >= 0) & ~truth].any()
        assert hit[owner < 0].mean() < 0.1
        assert d.flag is None


def test_guard_fires_on_a_flat_score_distribution():
    from persrep.find.calibrate import decide

    rng = np.random.default_rng(1)
    # a collapsed model: every photo scores about the same, and higher than any rival
    flat = rng.normal(0.95, 0.002, 1000)
    d = decide(flat, np.full(1000, 0.5))
    assert d.flag is not None and "100 %" in d.flag and "more than 20 %" in d.flag
    # the share is an option: 100 % of the photos is not more than 100 %
    assert decide(flat, np.full(1000, 0.5), guard=1.0).flag is None
    # a normal instance of the synthetic collection is not flagged
    owner, S, R = _synthetic(rng)
    assert decide(S[:, 0], R[:, 0]).flag is None
    # without rivals (a one-instance data set) the guard counts the hits themselves
    assert decide(S[:, 0], np.full(len(S), -1.0)).flag is None


def test_decide_ignores_unreadable_rows_and_needs_to_win():
    from persrep.find.calibrate import decide

    rng = np.random.default_rng(2)
    s = rng.normal(0.4, 0.05, 500)
    s[:10] = 0.9
    r = s + 0.05  # background photos are closer to some other object
    r[5:10] = 0.3
    r[:5] = 0.95  # five strong photos are closer to another object: not hits
    s[-3:] = np.nan
    d = decide(s, r)
    assert list(d.tier[:10]) == [""] * 5 + ["likely"] * 5
    assert (d.tier[-3:] == "").all() and d.likely == 5 and d.possible == 0 and d.flag is None


# -- the job, in-process on a local collection -----------------------------------------------------
@pytest.mark.slow
def test_find_local_collection_in_process(finished_run, tmp_path):
    root, run_dir = finished_run
    photos = _collection(run_dir, tmp_path / "photos")
    out = tmp_path / "out" / "finds" / "mine"
    res = run_find(FindOptions(photos=str(photos), run=str(run_dir), out=str(out), model="both",
                               top_k=3, borderline=2))
    s = res.summary
    # corrupt files listed and skipped, other files ignored, every photo scanned
    n_test = sum(1 for p in (_dataset(run_dir) / "test").rglob("*.png"))
    assert s["images_scanned"] == n_test and s["unreadable"] == len(BAD)
    assert {u["path"] for u in s["unreadable_files"]} == BAD
    assert all(u["error"].startswith(("decode:", "read:")) for u in s["unreadable_files"])
    assert s["files_ignored"] == 2  # notes.txt and the hidden .hidden.jpg
    assert pd.read_parquet(out / "unreadable.parquet")["path"].tolist() == sorted(BAD)
    # published manifest-last with every output
    man = json.loads((out / "MANIFEST.json").read_text())
    assert set(man["files"]) == {"hits.parquet", "hits.csv", "scores.parquet", "unreadable.parquet", "find.html",
                                 "summary.json"}
    # scores: every photo x (pretrained, personalised) x instance, with its rival, z and tier;
    # deciding again from the stored columns gives the stored tiers (a variant needs no rescan)
    from persrep.find.calibrate import decide

    scores = pd.read_parquet(out / "scores.parquet")
    assert len(scores) == n_test * 2 * 4
    assert (scores["decision"] == (scores["tier"] != "")).all()
    assert set(scores["tier"]) <= {"likely", "possible", ""}
    for inst, g in scores.groupby("instance"):
        pre, pers = g[g["model"] == "pretrained"], g[g["model"] == "personalised"]
        assert pre["path"].tolist() == pers["path"].tolist()
        again_pre = decide(pre["score"].to_numpy(), pre["rival"].to_numpy())
        assert list(again_pre.tier) == pre["tier"].tolist()
        # personalised: likely = the pretrained model agrees, possible = personalised alone
        again = decide(pers["score"].to_numpy(), pers["rival"].to_numpy(), support=again_pre.tier != "")
        assert list(again.tier) == pers["tier"].tolist()
        assert ((pers["tier"] != "likely") | (pre["tier"].to_numpy() != "")).all()
        assert ((g["tier"] == "") | (g["score"] > g["rival"])).all()  # a hit beats every rival
    # hits: personalised decisions, boxes and RLE masks on the top hits; hits.csv = the decided rows
    hits = pd.read_parquet(out / "hits.parquet")
    assert set(hits["model"]) == {"personalised"}
    per = scores[scores["model"] == "personalised"]
    assert set(hits[hits["decision"]]["path"] + hits[hits["decision"]]["instance"]) == \
        set(per[per["decision"]]["path"] + per[per["decision"]]["instance"])
    csv = pd.read_csv(out / "hits.csv")
    assert sorted(csv["path"] + csv["instance"]) == sorted(per[per["decision"]]["path"] + per[per["decision"]]["instance"])
    top = hits[hits["top"]]
    assert top.groupby("instance").size().max() <= 3
    from pycocotools import mask as mask_utils

    for _, r in top.iterrows():
        if r["box"] is None:
            continue
        h, w = r["mask_size"]
        m = mask_utils.decode({"size": [int(h), int(w)], "counts": r["mask_rle"].encode()})
        with Image.open(photos / r["path"]) as im:
            assert (h, w) == (im.height, im.width)
        ys, xs = np.nonzero(m)
        assert list(r["box"]) == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    assert hits["borderline"].sum() <= 2 * 4
    assert not (hits["borderline"] & hits["decision"]).any()  # near misses are not hits
    # per instance: tier counts, the background fit, the guard
    for inst, v in s["instances"].items():
        assert v["likely"] + v["possible"] == v["hits"] == int(per[per["instance"] == inst]["decision"].sum())
        assert v["likely_threshold"] > v["possible_threshold"] > v["background"]["median"]
    assert s["calibration"]["guard_share"] == 0.2 and s["calibration"]["reference_photos"] == 12
    # MLflow: one run for the job with the gallery as an artifact
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    run = client.get_run(s["mlflow_run_id"])
    assert run.data.tags["persrep.kind"] == "find"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"find.html", "summary.json"}
    assert run.data.metrics["images_scanned"] == n_test


@pytest.mark.slow
def test_scores_match_an_independent_forward(finished_run, tmp_path):
    """Swapped LoRA tensors + shared trunk give the scores of a plainly loaded adapter (float64)."""
    import torch

    from persrep.evaluation.features import l2_normalize
    from persrep.find.models import Extractors, ModelSpec
    from persrep.find.source import resolve_run
    from persrep.models.backbones import build_backbone, eval_transform
    from persrep.models.lora import load_adapter

    _, run_dir = finished_run
    src = resolve_run(str(run_dir))
    specs = [ModelSpec("pretrained", None)] + [ModelSpec(t.instance, t.adapter_key) for t in src.targets]
    ex = Extractors(src, specs, share_trunk=True)
    assert ex.split is not None, "EfficientNet with LoRA on its last blocks should share its trunk"
    ds = src.dataset
    imgs = [ds.read_image(p) for _, p in ds.test_pool("test")[:6]]
    tf = eval_transform(src.backbone)
    x = torch.stack([tf(im) for im in imgs])
    got = ex.global_features(x)
    for t in src.targets:
        path = tmp_path / f"{t.instance}.safetensors"
        path.write_bytes(src.storage.read_unit_file("adapters", t.adapter_key, "adapter.safetensors"))
        bb = load_adapter(build_backbone(src.backbone), path).eval()
        with torch.inference_mode():
            ref = bb.global_features(x, feature=src.global_feature).double().numpy()
        assert np.allclose(got[t.instance], ref, atol=1e-4)
        assert not np.allclose(got[t.instance], got["pretrained"], atol=1e-6)
    with torch.inference_mode():
        plain = build_backbone(src.backbone).eval().global_features(x, feature=src.global_feature).numpy()
    assert np.allclose(got["pretrained"], plain, atol=1e-4)
    assert np.allclose(l2_normalize(got["pretrained"]), l2_normalize(plain), atol=1e-4)


def test_pretrained_share_blends_each_personalised_feature_with_the_pretrained_one(finished_run):
    """evaluation.pretrained_share of the run: find embeds as the run evaluated (persrep/models/blend.py)."""
    import torch

    from persrep.find.models import Extractors, ModelSpec, extractor_key
    from persrep.find.source import resolve_run
    from persrep.models.backbones import eval_transform
    from persrep.models.blend import blend_arrays

    _, run_dir = finished_run
    src = resolve_run(str(run_dir))
    specs = [ModelSpec("pretrained", None)] + [ModelSpec(t.instance, t.adapter_key) for t in src.targets]
    ds = src.dataset
    tf = eval_transform(src.backbone)
    x = torch.stack([tf(ds.read_image(p)) for _, p in ds.test_pool("test")[:5]])
    plain = Extractors(src, specs).global_features(x)
    keys = {s.name: extractor_key(src, s) for s in specs}
    src.settings = src.settings.model_copy(update={"evaluation": src.settings.evaluation.model_copy(
        update={"pretrained_share": 0.4})})
    mixed = Extractors(src, specs).global_features(x)
    assert np.allclose(mixed["pretrained"], plain["pretrained"], atol=1e-6)
    for t in src.targets:
        want = blend_arrays(plain[t.instance], plain["pretrained"], 0.4)
        assert np.allclose(mixed[t.instance], want, atol=1e-5)
    # cached embeddings of the unblended adapters are never served for the blended ones
    assert all(extractor_key(src, s) != keys[s.name] for s in specs if s.adapter_key)
    assert extractor_key(src, specs[0]) == keys["pretrained"]


def test_global_input_size_of_the_run_sizes_and_keys_find_embeddings(finished_run):
    """evaluation.global_input_size of the run: find embeds at that size, under other cache keys."""
    from PIL import Image as PILImage

    from persrep.find.models import Extractors, ModelSpec, extractor_key
    from persrep.find.source import resolve_run

    _, run_dir = finished_run
    src = resolve_run(str(run_dir))
    specs = [ModelSpec("pretrained", None)] + [ModelSpec(t.instance, t.adapter_key) for t in src.targets]
    keys = {s.name: extractor_key(src, s) for s in specs}
    assert Extractors(src, specs).transform(PILImage.new("RGB", (50, 40))).shape[-1] == src.backbone.image_size
    src.settings = src.settings.model_copy(update={"evaluation": src.settings.evaluation.model_copy(
        update={"global_input_size": 96})})
    assert Extractors(src, specs).transform(PILImage.new("RGB", (50, 40))).shape[-1] == 96
    assert all(extractor_key(src, s) != keys[s.name] for s in specs)


class _Interrupted(RuntimeError):
    pass


class _DyingRunner(LocalRunner):
    """Stops the scan after ``after`` batches, as a killed job would."""

    def __init__(self, after: int):
        self.after = after

    def scan(self, plan, path_batches, say):
        for k, table in enumerate(super().scan(plan, path_batches, say)):
            if k == self.after:
                raise _Interrupted("killed")
            yield table


@pytest.mark.slow
def test_interrupted_job_resumes_from_the_embedding_cache(finished_run, tmp_path):
    _, run_dir = finished_run
    photos = _collection(run_dir, tmp_path / "photos")
    opts = dict(photos=str(photos), run=str(run_dir), cache=str(tmp_path / "cache"), batch_size=8,
                instances=["mug_0"], tracking=False, out=str(tmp_path / "o" / "finds" / "a"))
    with pytest.raises(_Interrupted):
        run_find(FindOptions(**opts), _DyingRunner(after=2))
    assert not (tmp_path / "o" / "finds" / "a" / "MANIFEST.json").exists()  # nothing looks finished
    cached = sum(len(pd.read_parquet(f)) for f in (tmp_path / "cache").rglob("*.parquet"))
    assert 0 < cached <= 2 * 3 * 8  # the batches embedded before the kill (2 models) were written
    first = run_find(FindOptions(**opts))
    n = first.summary["images_scanned"]
    # the rest, and only the rest (cached = rows of both models' stores: pretrained and mug_0)
    assert first.summary["embeddings_computed"] == 2 * n - cached
    again = run_find(FindOptions(**opts))
    assert again.summary["embeddings_computed"] == 0 and again.summary["embeddings_reused"] == 2 * n
    pd.testing.assert_frame_equal(first.scores.to_pandas(), again.scores.to_pandas())
    # a new instance on the same collection embeds only with its own adapter
    third = run_find(FindOptions(**{**opts, "instances": ["mug_0", "bottle_1"]}))
    assert third.summary["embeddings_computed"] == n


@pytest.mark.slow
def test_s3_collection_and_outputs(finished_run, tmp_path, s3_bucket, s3_server):
    import boto3

    _, run_dir = finished_run
    photos = _collection(run_dir, tmp_path / "photos")
    s3 = boto3.client("s3", endpoint_url=s3_server)
    for f in sorted(photos.rglob("*")):
        if f.is_file():
            s3.put_object(Bucket=s3_bucket, Key=f"photos/{f.relative_to(photos)}", Body=f.read_bytes())
    local = run_find(FindOptions(photos=str(photos), run=str(run_dir), instances=["bottle_0"], tracking=False,
                                 out=str(tmp_path / "o" / "finds" / "local")))
    res = run_find(FindOptions(photos=f"s3://{s3_bucket}/photos", run=str(run_dir), instances=["bottle_0"],
                               tracking=False, out=f"s3://{s3_bucket}/finds/out/mine",
                               cache=f"s3://{s3_bucket}/cache"))
    assert res.summary["unreadable"] == len(BAD)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="finds/out/mine/")["Contents"]}
    assert "finds/out/mine/MANIFEST.json" in keys and "finds/out/mine/find.html" in keys
    hits = pd.read_parquet(io.BytesIO(s3.get_object(Bucket=s3_bucket, Key="finds/out/mine/hits.parquet")["Body"].read()))
    assert len(hits) > 0
    pd.testing.assert_frame_equal(local.scores.to_pandas(), res.scores.to_pandas())


class _ExitOnce:
    """A Scanner that kills its actor process once, mid-batch (marker file: once per test)."""

    def __init__(self, plan, torch_threads=None, marker=""):
        from persrep.find.scan import Scanner

        self.inner, self.marker = Scanner(plan, torch_threads=torch_threads), marker

    def __call__(self, paths):
        if any(p.startswith("mug_1/") for p in paths) and not Path(self.marker).exists():
            Path(self.marker).write_text("dead")
            os._exit(1)
        return self.inner(paths)


def _exit_once_factory(plan, torch_threads=None, marker=""):
    return _ExitOnce(plan, torch_threads, marker)


@pytest.mark.slow
def test_ray_scan_survives_a_killed_actor(finished_run, tmp_path, ray_local):
    from persrep.distributed.find import RayRunner

    ray_local.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the fault travels by value
    _, run_dir = finished_run
    photos = _collection(run_dir, tmp_path / "photos")
    marker = tmp_path / "killed"
    runner = RayRunner(num_actors=2, use_gpus=False, max_retries=2, no_progress_timeout_s=300,
                       scanner_factory=functools.partial(_exit_once_factory, marker=str(marker)))
    res = run_find(FindOptions(photos=str(photos), run=str(run_dir), instances=["mug_1"], batch_size=4,
                               tracking=False, out=str(tmp_path / "o" / "finds" / "ray")), runner)
    assert marker.exists(), "the actor was never killed"
    local = run_find(FindOptions(photos=str(photos), run=str(run_dir), instances=["mug_1"], batch_size=4,
                                 tracking=False, out=str(tmp_path / "o" / "finds" / "local")))
    # every photo scored exactly once, with the in-process scores
    got, want = res.scores.to_pandas(), local.scores.to_pandas()
    assert not got.duplicated(["path", "model", "instance"]).any()
    pd.testing.assert_frame_equal(got, want, atol=1e-5, check_exact=False)
    assert res.summary["unreadable"] == len(BAD) and res.summary["runner"] == "ray"


@pytest.mark.slow
def test_gallery_renders_in_headless_chromium(finished_run, tmp_path, chromium_screenshot):
    _, run_dir = finished_run
    photos = _collection(run_dir, tmp_path / "photos")
    out = tmp_path / "o" / "finds" / "g"
    run_find(FindOptions(photos=str(photos), run=str(run_dir), instances=["bottle_0", "mug_1"], tracking=False,
                         out=str(out), top_k=4))
    page = (out / "find.html").read_text()
    assert page.count("<h2 id=") == 2 and "Reference photos" in page and "Near misses" in page
    assert "corrupt.jpg" in page  # unreadable files are listed
    # first screen: one line per object linking to its section; thumbnails link to the photo
    assert page.count("<tr><td><a href='#i-") == 2 and "id='i-bottle_0'" in page
    assert f'href="file://{photos}' in page and "no box" not in page
    assert "personalised models &middot; run" in page and " model &middot;" not in page  # the option in words
    arr = chromium_screenshot(out / "find.html", 1280, 1600)
    assert arr.std() > 15, f"screenshot looks blank (std {arr.std():.1f})"
    assert arr[5:40, :, 2].mean() > arr[5:40, :, 0].mean() + 20  # the header band rendered
    # the thumbnails rendered: many distinct colours below the header (photos, not flat boxes)
    body = arr[300:].reshape(-1, 3).astype(int)
    assert len(np.unique(body[:, 0] * 65536 + body[:, 1] * 256 + body[:, 2])) > 500


@pytest.mark.slow
def test_cli_bad_input_is_one_line_exit_2(finished_run, tmp_path, capsys):
    from persrep.cli import main

    _, run_dir = finished_run
    cases = [
        (["--run", str(run_dir), "--photos", str(tmp_path / "nope")], "not found"),
        (["--run", str(tmp_path / "runs" / "x"), "--photos", str(tmp_path)], "not a finished run"),
        (["--run", str(run_dir), "--photos", str(tmp_path), "--instances", "ghost"], "ghost"),
        (["--run", str(run_dir), "--photos", str(tmp_path), "--data-config", "dreambooth"], "dreambooth"),
        (["--adapter", str(tmp_path / "adapters" / "k"), "--photos", str(tmp_path)], "--adapter"),
    ]
    (tmp_path / "runs" / "x").mkdir(parents=True)
    for args, fragment in cases:
        assert main(["find", *args, "--no-ray", "--no-tracking"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0], err


@pytest.mark.slow
def test_adapter_dir_resolves_to_its_run_and_instance(finished_run):
    from persrep.find.source import resolve_adapter, resolve_run

    root, run_dir = finished_run
    best = resolve_run(str(run_dir))
    target = best.targets[0]
    one = resolve_adapter(str(root / "adapters" / target.adapter_key))
    assert one.run_id == "toy" and [t.instance for t in one.targets] == [target.instance]
    assert one.targets[0].adapter_key == target.adapter_key
    # the best configuration per instance is the one with the highest AP in the run's results
    frame = pd.read_parquet(run_dir / "results.parquet")
    mine = frame[(frame["instance"] == target.instance) & (frame["model"] == "personalised")
                 & (frame["task"] == "classification") & (frame["metric"] == "ap") & (frame["scene"] == "all")]
    assert target.run_ap == pytest.approx(mine["value"].max())


@pytest.mark.slow
def test_out_takes_any_directory(finished_run, tmp_path, monkeypatch):
    """``--out`` is any directory: relative one level (``finds_p``), two levels, deep, absolute."""
    _, run_dir = finished_run
    photos = _collection(run_dir, tmp_path / "photos")
    monkeypatch.chdir(tmp_path)
    deep = tmp_path / "a" / "b" / "c" / "d" / "e"
    for out, where in (("finds_p", tmp_path / "finds_p"), ("finds/p", tmp_path / "finds" / "p"), (str(deep), deep)):
        res = run_find(FindOptions(photos=str(photos), run=str(run_dir), instances=["mug_0"], tracking=False,
                                   out=out, cache=str(tmp_path / "cache"), top_k=2, borderline=1))
        man = json.loads((where / "MANIFEST.json").read_text())
        assert {"find.html", "hits.csv", "hits.parquet", "scores.parquet"} <= set(man["files"])
        assert res.out == out and res.summary["find_id"] == where.name
    # a re-run into the same directory replaces the find (manifest last, files rewritten)
    again = run_find(FindOptions(photos=str(photos), run=str(run_dir), instances=["mug_0"], tracking=False,
                                 out="finds_p", cache=str(tmp_path / "cache"), top_k=2, borderline=1))
    assert again.summary["embeddings_computed"] == 0
    assert json.loads((tmp_path / "finds_p" / "MANIFEST.json").read_text())["files"]["hits.csv"]["size"] > 0


PRE_RAY_SCRIPT = """
import json, sys
import ray
from persrep.cli import main
out = []
for args in json.loads(sys.argv[1]):
    rc = main(["find", *args])
    out.append([rc, ray.is_initialized()])
print(json.dumps(out))
"""


def test_expansion_rescores_from_the_cache(finished_run, tmp_path):
    """--expand re-scores from the scan's stored embeddings: nothing is embedded again, a score can
    only rise (a max over a superset of references), some do, and only first-pass hits join."""
    _, run_dir = finished_run
    photos = _collection(run_dir, tmp_path / "photos")
    opts = dict(photos=str(photos), run=str(run_dir), cache=str(tmp_path / "cache"), batch_size=8,
                instances=["mug_0", "bottle_1"], tracking=False)
    plain = run_find(FindOptions(**opts, out=str(tmp_path / "o" / "plain"), expand=0))
    expanded = run_find(FindOptions(**opts, out=str(tmp_path / "o" / "expanded"), expand=2))
    assert expanded.summary["embeddings_computed"] == 0
    assert expanded.summary["calibration"]["expand"] == 2 and plain.summary["calibration"]["expand"] == 0
    keys = ["path", "model", "instance"]
    m = plain.scores.to_pandas().merge(expanded.scores.to_pandas(), on=keys, suffixes=("_0", "_2"))
    assert len(m) == len(plain.scores)
    assert (m["score_2"] >= m["score_0"] - 1e-6).all() and (m["rival_2"] >= m["rival_0"] - 1e-6).all()
    assert (m["score_2"] > m["score_0"] + 1e-3).any()
    # the photos an object took into its references score 1.0 for it under its own model: at most
    # 2 per object, each a hit of the first decision
    top = m[(m["model"] == "personalised") & (m["score_2"] > 1 - 1e-5)]
    assert 1 <= top.groupby("instance").size().max() <= 2
    assert (top["tier_0"] != "").all()


@pytest.mark.slow
def test_bad_options_are_refused_before_ray_starts(finished_run, tmp_path):
    """Without --no-ray: every bad option is one line and exit 2, and no Ray cluster was started
    (a fresh process, so no cluster of another test is around)."""
    import subprocess

    _, run_dir = finished_run
    photos = _collection(run_dir, tmp_path / "photos")
    (tmp_path / "a_file").write_text("not a directory")
    cases = [
        (["--out", str(tmp_path / "a_file" / "out")], "--out"),
        (["--out", "gs://bucket/finds"], "--out"),
        (["--cache", "ftp://x/y"], "--cache"),
        (["--guard", "0"], "--guard"),
        (["--guard", "1.5"], "--guard"),
        (["--top-k", "0"], "--top-k"),
        (["--expand", "-1"], "--expand"),
        (["--photos", str(tmp_path / "nope")], "not found"),
        (["--photos", str(tmp_path / "a_file")], "is a file"),
        (["--instances", "ghost"], "ghost"),
    ]
    argvs = []
    for extra, _ in cases:
        args = ["--run", str(run_dir), "--photos", str(photos), "--no-tracking"]
        if extra[0] in args:  # the case's option replaces the default one
            args[args.index(extra[0]) + 1] = extra[1]
        else:
            args += extra
        argvs.append(args)
    proc = subprocess.run([sys.executable, "-c", PRE_RAY_SCRIPT, json.dumps(argvs)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "RAY_ADDRESS": ""})
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    errors = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("persrep find:")]
    assert len(errors) == len(cases), proc.stderr[-2000:]
    for (extra, fragment), (rc, started), err in zip(cases, results, errors):
        assert rc == 2 and not started, (extra, rc, started)
        assert fragment in err, (extra, err)
    assert "Started a local Ray instance" not in proc.stderr
