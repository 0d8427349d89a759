"""Quality sanity on real photos: the offline EfficientNet-Lite0 (real ImageNet weights), pretrained,
evaluated through ``Evaluator`` on COIL-100 composites (PODS-style scenes on real backgrounds).

Kept small (8 test scenes per instance, 14 instances, classification + retrieval only) so it runs
in well under a minute on 2 cores. The bands are wide on purpose: they catch a broken pipeline
(chance-level or perfect scores, missing scenes, scenes not getting harder), not a 1-point drift.
Measured (24 scenes per instance, 224 px): AP 0.76 +- 0.15, NDCG 0.86 +- 0.07; AP in_distribution
0.84 vs pose_and_distractors 0.43 (see bench/quality.json).
"""

from __future__ import annotations

import pytest

from persrep.config import BackboneSettings, EvaluationSettings
from persrep.data.composite import CompositeSettings, write_composite
from persrep.data.importer import import_folder
from persrep.data.layout import SCENES, open_dataset
from persrep.evaluation.aggregate import results_frame, summarize
from persrep.evaluation.stage import Evaluator

pytestmark = [pytest.mark.realdata, pytest.mark.slow]


@pytest.fixture(scope="module")
def pretrained_results(shared_data, tmp_path_factory):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # restored below: later tests compare bits with 1-thread subprocesses
    root = tmp_path_factory.mktemp("quality")
    import_folder(shared_data / "coil100_subset", root / "coil",
                  masks=shared_data / "coil100_subset_masks", train_indices="0,24,48")
    res = write_composite(root / "coil", shared_data / "backgrounds", root / "comp",
                          CompositeSettings(test_per_instance=8, size=224))
    ds = open_dataset(str(res.dest))
    bs = BackboneSettings(name="tf_efficientnet_lite0", weights="offline", image_size=224)
    ev = Evaluator(ds, EvaluationSettings(tasks=["classification", "retrieval"]))
    try:
        rows = ev.evaluate_pretrained(bs, ds.names, {"backbone": bs.name})
    finally:
        torch.set_num_threads(threads)
    return ds, results_frame(rows)


def _mean(summary, task, metric, scene="all") -> float:
    sel = summary[(summary.task == task) & (summary.metric == metric) & (summary.scene == scene)]
    assert len(sel) == 1, f"no {task}/{metric}/{scene} row"
    return float(sel["mean"].iloc[0])


def test_pretrained_scores_in_a_sane_range(pretrained_results):
    ds, frame = pretrained_results
    assert (frame.status == "ok").all(), frame[frame.status != "ok"][["task", "reason"]]
    summary = summarize(frame)
    n = len(ds.names)
    chance = 1 / n  # one instance's positives among every instance's test images
    ap = _mean(summary, "classification", "ap")
    ndcg = _mean(summary, "retrieval", "ndcg")
    assert 0.3 < ap < 0.97, f"classification AP {ap:.3f}: expected well above chance {chance:.3f}, not saturated"
    assert 0.6 < ndcg < 0.99, f"retrieval NDCG {ndcg:.3f} out of the plausible band"
    per_instance = frame[(frame.task == "classification") & (frame.metric == "ap") & (frame.scene == "all")]
    assert len(per_instance) == n and per_instance.value.between(0, 1).all()
    assert (per_instance.value > chance).mean() >= 0.9  # nearly every instance beats chance
    row = summary[(summary.task == "classification") & (summary.metric == "ap") & (summary.scene == "all")]
    assert int(row["n"].iloc[0]) == n and float(row["std"].iloc[0]) > 0  # spread over instances


def test_per_scene_breakdown_and_difficulty(pretrained_results):
    _, frame = pretrained_results
    summary = summarize(frame)
    for task, metric in (("classification", "ap"), ("retrieval", "ndcg")):
        scenes = set(summary[(summary.task == task) & (summary.metric == metric)].scene)
        assert scenes == {"all", *SCENES}, f"{task}: scenes {sorted(scenes)}"
        easy = _mean(summary, task, metric, "in_distribution")
        hard = _mean(summary, task, metric, "pose_and_distractors")
        assert hard < easy, f"{task} {metric}: pose_and_distractors {hard:.3f} >= in_distribution {easy:.3f}"
        # distractors alone also cost something against in-distribution
        assert _mean(summary, task, metric, "distractors") < easy
    assert _mean(summary, "classification", "ap", "in_distribution") - \
        _mean(summary, "classification", "ap", "pose_and_distractors") > 0.1
