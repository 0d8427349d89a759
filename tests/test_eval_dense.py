"""Dense pipeline on synthetic feature maps, hand-checked boxes, and the COCO scoring path."""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from persrep.evaluation import dense as DN
from persrep.evaluation.coco_eval import (Detection, EvalImage, coco_evaluate, encode_mask,
                                          mask_iou)
from persrep.evaluation.dense_task import DensePool, DenseTrainSet, evaluate_dense
from persrep.evaluation.records import Score, Skipped

D = 16
BACKGROUND, OBJECT, OTHER_OBJECT = np.eye(D)[0], np.eye(D)[1], np.eye(D)[2]


def ellipse(size: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    y, x = np.mgrid[:size, :size]
    return ((y + 0.5 - cy) / ry) ** 2 + ((x + 0.5 - cx) / rx) ** 2 <= 1


def synthetic_features(rng, mask: np.ndarray, grid: int, obj: np.ndarray,
                       noise: float = 0.3) -> np.ndarray:
    """Patches mostly covered by the object point along ``obj``, the rest along BACKGROUND."""
    inside = DN.patch_coverage(mask, (grid, grid)) >= 0.5
    f = np.where(inside[None], obj[:, None, None], BACKGROUND[:, None, None])
    return f + noise / np.sqrt(D) * rng.normal(size=f.shape)


def random_ellipse(rng, size: int = 128) -> np.ndarray:
    return ellipse(size, rng.uniform(40, 88), rng.uniform(40, 88), rng.uniform(15, 30),
                   rng.uniform(15, 30))


# ---------------------------------------------------------------------------------------------
# the prediction pipeline
def test_pipeline_recovers_pasted_object_mask():
    rng = np.random.default_rng(0)
    train_masks = [ellipse(128, 40, 50, 20, 30), ellipse(128, 80, 70, 25, 20)]
    train = [synthetic_features(rng, m, 32, OBJECT) for m in train_masks]
    reference = DN.build_reference(train, train_masks)
    for _ in range(6):
        gt = random_ellipse(rng)
        pred = DN.predict(synthetic_features(rng, gt, 32, OBJECT), (128, 128), reference)
        assert mask_iou(pred.mask, gt) >= 0.8
        assert pred.score > 0.9
    # another object in the same background: much lower confidence than the true object
    other = DN.predict(synthetic_features(rng, random_ellipse(rng), 32, OTHER_OBJECT),
                       (128, 128), reference)
    assert other.score < 0.6


def test_reference_feature_is_elementwise_max_plus_mean():
    dense = np.zeros((2, 2, 2), dtype=np.float32)
    dense[:, 0, 0] = [1.0, 0.0]
    dense[:, 0, 1] = [0.6, 0.8]
    dense[:, 1, :] = [[0.0, 0.0], [1.0, 1.0]]  # masked out
    mask = np.zeros((4, 4), dtype=bool)
    mask[:2, :] = True  # the top row of patches
    combined = 0.5 * np.array([1.0, 0.8]) + 0.5 * np.array([0.8, 0.4])
    np.testing.assert_allclose(DN.reference_feature(dense, mask),
                               combined / np.linalg.norm(combined), atol=1e-6)
    mean = np.array([0.8, 0.4])
    np.testing.assert_allclose(DN.reference_feature(dense, mask, combine="mean"),
                               mean / np.linalg.norm(mean), atol=1e-6)


def test_patch_grid_rules_by_hand():
    # 8x8 image on a 4x4 grid: patches are 2x2 pixels
    assert np.argwhere(DN.box_on_patch_grid((2, 2, 4, 4), (8, 8), (4, 4))).tolist() == [
        [1, 1], [1, 2], [2, 1], [2, 2]]
    # shifted by one pixel: edge patches are half covered (kept), corners a quarter (dropped)
    plus = np.array([[0, 1, 0, 0], [1, 1, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]], dtype=bool)
    np.testing.assert_array_equal(DN.box_on_patch_grid((1, 1, 4, 4), (8, 8), (4, 4)), plus)
    assert np.argwhere(DN.box_on_patch_grid((1, 1, 3, 3), (8, 8), (4, 4))).tolist() == [
        [0, 1], [1, 0], [1, 1]]
    # a one-pixel object covers no patch by half: the best-covered patch is used
    tiny = np.zeros((8, 8), dtype=bool)
    tiny[5, 6] = True
    assert np.argwhere(DN.mask_on_patch_grid(tiny, (4, 4))).tolist() == [[2, 3]]
    assert not DN.mask_on_patch_grid(np.zeros((8, 8)), (4, 4)).any()


def test_box_and_confidence_by_hand_on_4x4_grid():
    dense = np.zeros((2, 4, 4), dtype=np.float32)
    dense[0] = 1.0  # background along x
    dense[:, 1:3, 1:3] = np.array([0.0, 1.0])[:, None, None]  # object along y
    dense[:, 1, 1] = [1.0, 1.0]  # one object patch tilted: box mean is not the reference
    reference = DN.InstanceReference(
        feature=np.array([0.0, 1.0]),
        train_box_features=np.array([[1.0, 0.0], [0.6, 0.8]]), reference_index=0)
    pred = DN.predict(dense, (8, 8), reference, morph_radius=0)
    assert pred.box == (2, 2, 4, 4)
    expected = np.mean([[1 / math.sqrt(2), 1 / math.sqrt(2)], [0, 1], [0, 1], [0, 1]], axis=0)
    expected /= np.linalg.norm(expected)
    assert pred.score == pytest.approx(max(expected @ [1.0, 0.0], expected @ [0.6, 0.8]), abs=1e-6)


def test_clean_mask_keeps_the_largest_blob_and_fills_holes():
    ring = ellipse(64, 32, 32, 20, 20) & ~ellipse(64, 32, 32, 8, 8)
    speck = np.zeros((64, 64), dtype=bool)
    speck[2:5, 2:5] = True
    cleaned = DN.clean_mask(ring | speck, morph_radius=1)
    assert not cleaned[2:5, 2:5].any()
    assert cleaned[32, 32]  # the hole is filled
    assert mask_iou(cleaned, ellipse(64, 32, 32, 20, 20)) > 0.97


def test_flat_similarity_predicts_nothing():
    reference = DN.InstanceReference(np.array([1.0, 0.0]), np.array([[1.0, 0.0]]), 0)
    pred = DN.predict(np.ones((2, 4, 4)), (8, 8), reference)
    assert pred.box is None and not pred.mask.any() and math.isnan(pred.score)


# ---------------------------------------------------------------------------------------------
# COCO scoring
def _square(size: int, y: int, x: int, side: int) -> np.ndarray:
    m = np.zeros((size, size), dtype=bool)
    m[y : y + side, x : x + side] = True
    return m


def _detection(image_id: int, mask: np.ndarray, score: float) -> Detection:
    return Detection(image_id, score, DN.mask_box(mask), encode_mask(mask))


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_perfect_predictions_score_one(iou_type):
    own = {0: _square(32, 2, 3, 10), 1: _square(32, 10, 8, 12), 2: _square(32, 5, 5, 20)}
    images = [EvalImage.from_mask(i, own.get(i), (32, 32)) for i in range(6)]
    detections = [_detection(i, m, 0.9) for i, m in own.items()]
    result = coco_evaluate(images, detections, iou_type)
    assert (result.map, result.map50, result.f1_50) == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_false_positive_ranked_above_the_true_positive(iou_type):
    gt = _square(32, 4, 4, 10)
    images = [EvalImage.from_mask(0, gt), EvalImage.from_mask(1, None, (32, 32))]
    detections = [_detection(1, _square(32, 0, 0, 8), 0.9), _detection(0, gt, 0.8)]
    result = coco_evaluate(images, detections, iou_type)
    # ranked FP, TP: precision 1/2 at recall 1, so the interpolated precision is 1/2 at every
    # recall point and every IoU; best F1 = 2 * (1/2 * 1) / (1/2 + 1) at the 0.8 threshold
    assert result.map == pytest.approx(0.5)
    assert result.map50 == pytest.approx(0.5)
    assert result.f1_50 == pytest.approx(2 / 3)
    swapped = [_detection(1, _square(32, 0, 0, 8), 0.7), _detection(0, gt, 0.8)]
    assert coco_evaluate(images, swapped, iou_type).map == pytest.approx(1.0)


def test_best_f1_picks_the_best_threshold():
    gts = {0: _square(32, 4, 4, 10), 1: _square(32, 8, 8, 10)}
    images = [EvalImage.from_mask(i, gts.get(i), (32, 32)) for i in range(3)]
    detections = [_detection(0, gts[0], 0.9), _detection(2, _square(32, 0, 0, 5), 0.8),
                  _detection(1, gts[1], 0.7)]
    # thresholds 0.9 / 0.8 / 0.7: F1 = 2/3, 1/2, 4/5
    assert coco_evaluate(images, detections, "bbox").f1_50 == pytest.approx(0.8)


def test_wrapper_matches_pycocotools_called_directly():
    rng = np.random.default_rng(4)
    size, n = 48, 12
    gts = {i: _square(size, *rng.integers(0, 20, 2), int(rng.integers(8, 24))) for i in range(5)}
    images = [EvalImage.from_mask(i, gts.get(i), (size, size)) for i in range(n)]
    detections = []
    for i in range(n):
        if i in gts:  # shifted copies of the GT: IoUs spread over the COCO thresholds
            y, x = np.argwhere(gts[i])[0] + rng.integers(-3, 4, 2)
            mask = _square(size, max(y, 0), max(x, 0), int(np.sqrt(gts[i].sum())))
        else:
            mask = _square(size, *rng.integers(0, 30, 2), 10)
        detections.append(_detection(i, mask, float(rng.uniform())))

    for iou_type in ("bbox", "segm"):
        ours = coco_evaluate(images, detections, iou_type)
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO()
            gt.dataset = {
                "images": [{"id": i, "height": size, "width": size} for i in range(n)],
                "categories": [{"id": 1, "name": "x"}],
                "annotations": [
                    {"id": k + 1, "image_id": i, "category_id": 1, "iscrowd": 0,
                     "area": float(m.sum()), "bbox": list(mask_utils.toBbox(encode_mask(m))),
                     "segmentation": encode_mask(m)} for k, (i, m) in enumerate(gts.items())]}
            gt.createIndex()
            key = "bbox" if iou_type == "bbox" else "segmentation"
            dt = gt.loadRes([{"image_id": d.image_id, "category_id": 1, "score": d.score,
                              key: list(d.box) if key == "bbox" else d.rle}
                             for d in detections])
            ev = COCOeval(gt, dt, iou_type)
            ev.evaluate(), ev.accumulate(), ev.summarize()
        assert 0.0 < ours.map < 1.0
        assert ours.map == pytest.approx(ev.stats[0])
        assert ours.map50 == pytest.approx(ev.stats[1])


def test_coco_edge_cases_and_silence(capsys):
    images = [EvalImage.from_mask(0, _square(16, 2, 2, 5)), EvalImage.from_mask(1, None, (16, 16))]
    missed = coco_evaluate(images, [], "bbox")
    assert (missed.map, missed.f1_50) == (0.0, 0.0)
    no_objects = coco_evaluate([images[1]], [_detection(1, _square(16, 0, 0, 4), 0.5)], "segm")
    assert math.isnan(no_objects.map) and math.isnan(no_objects.f1_50)
    coco_evaluate(images, [_detection(0, _square(16, 2, 2, 5), 0.5)], "segm")
    assert capsys.readouterr().out == ""
    with pytest.raises(ValueError, match="unknown image"):
        coco_evaluate(images, [_detection(7, _square(16, 0, 0, 4), 0.5)], "bbox")


# ---------------------------------------------------------------------------------------------
# the dense task over a pool
def _dense_pool(rng, with_masks: bool = True):
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    masks = [random_ellipse(rng) for _ in labels]
    features = [synthetic_features(rng, m, 32, OBJECT if l == 0 else OTHER_OBJECT)
                for m, l in zip(masks, labels)]
    pool = DensePool(np.stack(features), labels, np.full((len(labels), 2), 128),
                     masks if with_masks else None)
    train_masks = [random_ellipse(rng) for _ in range(3)]
    train = DenseTrainSet([synthetic_features(rng, m, 32, OBJECT) for m in train_masks],
                          train_masks)
    return pool, train


def test_evaluate_dense_scores_a_separable_instance_highly():
    pool, train = _dense_pool(np.random.default_rng(1))
    seen = []
    results = evaluate_dense(0, pool, train, progress=lambda done, total: seen.append(done))
    values = {(r.task, r.metric): r.value for r in results}
    assert seen == list(range(1, 8))
    assert values[("detection", "map50")] == 1.0
    assert values[("segmentation", "map50")] == 1.0
    assert values[("detection", "f1_50")] == 1.0
    assert values[("segmentation", "mean_iou")] >= 0.8
    assert set(values) == {(t, m) for t in ("detection", "segmentation")
                           for m in ("map", "map50", "f1_50")} | {("segmentation", "mean_iou")}


def test_evaluate_dense_skips_with_reasons():
    pool, train = _dense_pool(np.random.default_rng(2), with_masks=False)
    results = evaluate_dense(0, pool, train)
    assert [type(r) for r in results] == [Skipped, Skipped]
    assert "ground-truth masks" in results[0].reason
    no_train_mask = DenseTrainSet(train.features, [None] * 3)
    pool, _ = _dense_pool(np.random.default_rng(2))
    (skipped,) = evaluate_dense(0, pool, no_train_mask, tasks=("segmentation",))
    assert skipped.task == "segmentation" and "training mask" in skipped.reason
    assert all(isinstance(r, Skipped) for r in evaluate_dense(0, None, train))
    assert all(isinstance(r, Score) for r in evaluate_dense(0, pool, train, tasks=("detection",)))
