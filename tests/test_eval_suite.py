"""Classification/retrieval against independent oracles, the suite, the cache, aggregation."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, ndcg_score, roc_auc_score

from persrep.evaluation.aggregate import (results_frame, skipped_summary, summarize,
                                          summarize_by_category)
from persrep.evaluation.cache import EmbeddingCache, image_list_key
from persrep.evaluation.classification import evaluate_classification
from persrep.evaluation.features import FeatureExtractor
from persrep.evaluation.records import Score, Skipped, to_rows
from persrep.evaluation.retrieval import evaluate_retrieval
from persrep.evaluation.suite import (GlobalPool, dense_train_sets, embed_dense_pool,
                                      embed_global_pool, evaluate_all, evaluate_instance)


def _by_key(scores):
    return {(s.metric, s.scene): s.value for s in scores}


# ---------------------------------------------------------------------------------------------
# classification and retrieval vs oracles written with torch + scikit-learn
def test_classification_matches_sklearn_on_max_cosine_scores():
    rng = np.random.default_rng(0)
    n_inst, d = 6, 8
    test_labels = np.repeat(np.arange(n_inst), 7)
    test = rng.normal(size=(len(test_labels), d)) + 2 * np.eye(d)[test_labels]
    scenes = np.array(["pose", "distractors", "in_distribution"])[np.arange(len(test)) % 3]
    for inst in range(n_inst):
        train = rng.normal(size=(3, d)) + 2 * np.eye(d)[inst]
        sims = F.cosine_similarity(torch.tensor(test)[:, None], torch.tensor(train)[None], dim=-1)
        oracle_scores = sims.max(dim=1).values.numpy()
        positive = test_labels == inst
        for negatives in ("all", "same_scene"):
            got = _by_key(evaluate_classification(test, test_labels, train, inst, scenes,
                                                  negatives))
            assert got[("ap", "all")] == pytest.approx(
                average_precision_score(positive, oracle_scores))
            assert got[("roc_auc", "all")] == pytest.approx(roc_auc_score(positive, oracle_scores))
            for scene in set(scenes):
                neg = ~positive if negatives == "all" else ~positive & (scenes == scene)
                keep = (positive & (scenes == scene)) | neg
                assert got[("ap", scene)] == pytest.approx(
                    average_precision_score(positive[keep], oracle_scores[keep]))


def test_retrieval_matches_per_query_oracles():
    rng = np.random.default_rng(1)
    n_inst, d = 5, 6
    gallery_labels = np.repeat(np.arange(n_inst), 3)
    gallery = rng.normal(size=(len(gallery_labels), d)) + np.eye(d)[gallery_labels]
    queries = rng.normal(size=(9, d)) + np.eye(d)[2]
    scenes = np.array(["a", "b", "b"] * 3)
    got = _by_key(evaluate_retrieval(queries, gallery, gallery_labels, 2, scenes))
    relevant = (gallery_labels == 2).astype(int)
    ndcgs, rrs, hits = [], [], []
    for q in queries:
        sims = F.cosine_similarity(torch.tensor(q)[None], torch.tensor(gallery), dim=-1).numpy()
        ranked = relevant[np.argsort(-sims)]
        ndcgs.append(ndcg_score(relevant[None], sims[None]))
        rrs.append(1.0 / (np.flatnonzero(ranked)[0] + 1))
        hits.append(float(ranked[:5].any()))
    assert got[("ndcg", "all")] == pytest.approx(np.mean(ndcgs))
    assert got[("mrr", "all")] == pytest.approx(np.mean(rrs))
    assert got[("hit@5", "all")] == pytest.approx(np.mean(hits))
    assert got[("ndcg", "b")] == pytest.approx(np.mean(np.array(ndcgs)[scenes == "b"]))
    assert got[("recall@10", "all")] <= 1.0 and got[("recall@1", "all")] <= got[("hit@1", "all")]


# ---------------------------------------------------------------------------------------------
# a fake backbone whose features are the image content, counting its calls
class CountingExtractor:
    """Global: a fixed projection of the pooled image. Dense: the image pooled to a patch grid."""

    def __init__(self, grid: int = 16, seed: int = 0):
        self.grid = grid
        self.projection = torch.randn(3 * 4 * 4, 12, generator=torch.Generator().manual_seed(seed))
        self.global_calls = 0
        self.dense_calls = 0

    def global_features(self, images: torch.Tensor) -> torch.Tensor:
        self.global_calls += 1
        return F.adaptive_avg_pool2d(images, 4).flatten(1) @ self.projection

    def dense_features(self, images: torch.Tensor) -> torch.Tensor:
        self.dense_calls += 1
        return F.adaptive_avg_pool2d(images, self.grid) + 0.01


def _square_mask(size: int, y: int, x: int, side: int) -> np.ndarray:
    m = np.zeros((size, size), dtype=bool)
    m[y : y + side, x : x + side] = True
    return m


def _world(rng, n_inst: int = 4, n_test: int = 5, size: int = 64):
    """Instance i = a square whose colour is channel 1 (+ a per-instance tint) on channel-0 ground."""
    def image(inst: int):
        side = int(rng.integers(16, 30))
        mask = _square_mask(size, *rng.integers(0, size - side, 2), side)
        img = torch.zeros(3, size, size)
        img[0] = torch.from_numpy(~mask).float()
        img[1] = torch.from_numpy(mask).float()
        img[2] = torch.from_numpy(mask).float() * inst / n_inst
        return img, mask

    test = [image(i) for i in range(n_inst) for _ in range(n_test)]
    train = [image(i) for i in range(n_inst) for _ in range(3)]
    return {
        "test_images": [t for t, _ in test], "test_masks": [m for _, m in test],
        "test_labels": np.repeat(np.arange(n_inst), n_test),
        "train_images": [t for t, _ in train], "train_masks": [m for _, m in train],
        "train_labels": np.repeat(np.arange(n_inst), 3),
        "scenes": np.array(["pose", "distractors"] * (n_inst * n_test // 2)),
        "names": [f"obj{i}" for i in range(n_inst)], "categories": ["mug", "mug", "shoe", "shoe"],
    }


def _pools(cache, extractor, world, key="pretrained"):
    glob = embed_global_pool(cache, extractor, key, world["test_images"], world["test_labels"],
                             image_list_key([f"t{i}" for i in range(len(world["test_images"]))]),
                             world["train_images"], world["train_labels"],
                             image_list_key([f"r{i}" for i in range(len(world["train_images"]))]),
                             world["scenes"])
    dense = embed_dense_pool(cache, extractor, key, world["test_images"], "dense-test",
                             world["test_labels"], [(64, 64)] * len(world["test_images"]),
                             world["test_masks"])
    train_dense = cache.dense_features(extractor, key, world["train_images"], "dense-train")
    return glob, dense, dense_train_sets(train_dense, world["train_labels"], world["train_masks"])


def test_cache_embeds_each_pool_once_across_instances(tmp_path):
    world = _world(np.random.default_rng(0))
    extractor = CountingExtractor()
    assert isinstance(extractor, FeatureExtractor)
    progress = []
    cache = EmbeddingCache(tmp_path, batch_size=8, progress=lambda *a: progress.append(a))
    # a per-instance pool callable, as for personalised backbones: same key -> cache hits
    rows = evaluate_all(world["names"], world["categories"],
                        global_pool=lambda i: _pools(cache, extractor, world)[0],
                        dense_pool=lambda i: _pools(cache, extractor, world)[1],
                        dense_train=lambda i: _pools(cache, extractor, world)[2](i),
                        keys={"backbone": "fake"})
    # test pool 20 images -> 3 batches, train gallery 12 -> 2 batches; dense likewise
    assert extractor.global_calls == 3 + 2
    assert extractor.dense_calls == 3 + 2
    assert ("global:" + image_list_key([f"t{i}" for i in range(20)]), 20, 20) in progress
    assert {r["task"] for r in rows} == {"classification", "retrieval", "detection",
                                         "segmentation"}
    assert all(r["status"] == "ok" and r["backbone"] == "fake" for r in rows)

    # a new process (new cache object) reuses the published files, memory-mapped
    fresh = CountingExtractor()
    glob, dense, _ = _pools(EmbeddingCache(tmp_path), fresh, world)
    assert fresh.global_calls == fresh.dense_calls == 0
    assert isinstance(dense.features, np.memmap) and dense.features.dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(dense.features[0].astype(np.float32), axis=0), 1,
                               atol=1e-2)
    assert not list(tmp_path.rglob(".*"))  # no temporary files left behind
    # another extractor key is another pool
    _pools(EmbeddingCache(tmp_path, batch_size=8), fresh, world, key="adapter-123")
    assert fresh.global_calls == 3 + 2


def test_suite_scores_a_separable_world_highly():
    world = _world(np.random.default_rng(1))
    glob, dense, train = _pools(EmbeddingCache(batch_size=64), CountingExtractor(), world)
    rows = evaluate_instance(1, "obj1", "mug", glob, dense, train(1), keys={"backbone": "fake"})
    values = {(r["task"], r["metric"], r["scene"]): r["value"] for r in rows}
    assert values[("segmentation", "mean_iou", "all")] > 0.8
    assert values[("detection", "map50", "all")] == 1.0
    assert {s for (_, _, s) in values} == {"all", "pose", "distractors"}


def test_missing_masks_give_skipped_rows_with_reasons():
    world = _world(np.random.default_rng(2))
    glob, dense, _ = _pools(EmbeddingCache(), CountingExtractor(), world)
    no_train_masks = dense_train_sets(
        EmbeddingCache().dense_features(CountingExtractor(), "k", world["train_images"], "r"),
        world["train_labels"], None)
    rows = evaluate_instance(0, "obj0", "mug", glob, dense, no_train_masks(0))
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert {r["task"] for r in skipped} == {"detection", "segmentation"}
    assert all("training mask" in r["reason"] and math.isnan(r["value"]) for r in skipped)
    assert any(r["task"] == "classification" and r["status"] == "ok" for r in rows)
    rows = evaluate_instance(0, "obj0", "mug", None, None, None, tasks=("retrieval",))
    assert rows[0]["status"] == "skipped" and "global embeddings" in rows[0]["reason"]
    with pytest.raises(ValueError, match="unknown tasks"):
        evaluate_instance(0, "obj0", "mug", glob, tasks=("depth",))


def test_global_pool_and_rows_validate_inputs():
    with pytest.raises(ValueError, match="test labels"):
        GlobalPool(np.zeros((3, 2)), np.zeros(2), np.zeros((1, 2)), np.zeros(1))
    with pytest.raises(ValueError, match="clash"):
        to_rows("a", "mug", [Score("retrieval", "ndcg", 1.0)], {"value": 3})


# ---------------------------------------------------------------------------------------------
# aggregation
def test_summaries_average_over_instances_per_setting_and_category():
    rows = []
    for backbone, offset in (("dino", 0.0), ("clip", 0.5)):
        for name, cat, ap in (("a", "mug", 0.2), ("b", "mug", 0.4), ("c", "shoe", 0.9)):
            rows += to_rows(name, cat, [Score("classification", "ap", ap + offset),
                                        Score("classification", "ap", math.nan, "pose")],
                            {"backbone": backbone})
    rows += to_rows("c", "shoe", [Skipped("detection", "no masks")], {"backbone": "dino"})
    frame = results_frame(rows)
    summary = summarize(frame).set_index(["backbone", "task", "metric", "scene"])
    dino = summary.loc[("dino", "classification", "ap", "all")]
    assert dino["mean"] == pytest.approx(0.5)
    assert dino["std"] == pytest.approx(np.std([0.2, 0.4, 0.9], ddof=1))
    assert (dino["n"], dino["n_nan"]) == (3, 0)
    assert summary.loc[("clip", "classification", "ap", "all")]["mean"] == pytest.approx(1.0)
    pose = summary.loc[("dino", "classification", "ap", "pose")]
    assert math.isnan(pose["mean"]) and (pose["n"], pose["n_nan"]) == (0, 3)
    assert ("dino", "detection") not in {k[:2] for k in summary.index}
    by_cat = summarize_by_category(frame).set_index(["backbone", "category", "scene"])
    assert by_cat.loc[("dino", "mug", "all")]["mean"] == pytest.approx(0.3)
    skipped = skipped_summary(frame)
    assert skipped.to_dict("records") == [{"backbone": "dino", "task": "detection",
                                           "reason": "no masks", "n_instances": 1}]
    assert isinstance(results_frame([]), pd.DataFrame) and summarize(results_frame([])).empty


def test_memory_cache_without_a_directory_embeds_once():
    world = _world(np.random.default_rng(3))
    extractor, cache = CountingExtractor(), EmbeddingCache(batch_size=8)
    for _ in range(3):
        _pools(cache, extractor, world)
    assert (extractor.global_calls, extractor.dense_calls) == (3 + 2, 3 + 2)
    cache.forget("pretrained")
    _pools(cache, extractor, world)
    assert extractor.global_calls == 2 * (3 + 2)


def test_with_global_feature_binds_the_mode():
    from persrep.evaluation.features import WithGlobalFeature

    class TwoModes:
        def global_features(self, x, feature="cls"):
            return x.flatten(1)[:, :2] if feature == "cls" else x.flatten(1)[:, :4]

        def dense_features(self, x):
            return x

    images = torch.rand(2, 3, 4, 4)
    cache = EmbeddingCache()
    cls = cache.global_embeddings(TwoModes(), "m/cls", images, "imgs")
    both = cache.global_embeddings(WithGlobalFeature(TwoModes(), "cls+mean"), "m/cls+mean",
                                   images, "imgs")
    assert cls.shape == (2, 2) and both.shape == (2, 4)


def test_streamed_dense_features_embed_each_batch_once_in_order():
    from persrep.evaluation.cache import StreamedDenseFeatures

    world = _world(np.random.default_rng(4))
    extractor = CountingExtractor()
    streamed = StreamedDenseFeatures(extractor, world["test_images"], batch_size=8)
    cached = EmbeddingCache().dense_features(CountingExtractor(), "k", world["test_images"], "t")
    for i in range(len(streamed)):
        np.testing.assert_allclose(streamed[i], cached[i].astype(np.float32), atol=2e-3)
    assert extractor.dense_calls == 3  # 20 images in batches of 8
    with pytest.raises(IndexError):
        streamed[20]
