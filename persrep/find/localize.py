"""The dense head on an instance's top hits: a detection box and a segmentation mask per photo.

Reuses the evaluation's training-free dense head (:mod:`persrep.evaluation.dense`): the
instance's reference feature comes from its train photos and their masks under the instance's
model; each hit's dense features give a similarity map -> Otsu mask -> box. Masks are stored as
COCO compressed RLE (pycocotools), boxes as COCO ``[x, y, w, h]`` in the photo's pixels. An
instance without train masks gets no box or mask, with the reason.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from persrep.evaluation.coco_eval import encode_mask
from persrep.evaluation.dense import build_reference, predict
from persrep.find.collection import Collection, load_image
from persrep.find.models import Extractors, ModelSpec
from persrep.models.backbones import eval_transform

__all__ = ["localize", "localize_many"]


def _rle_text(mask: np.ndarray) -> str:
    rle = encode_mask(mask)
    counts = rle["counts"]
    return counts.decode() if isinstance(counts, bytes) else str(counts)


def localize(source, collection: Collection, model: str, instance: str, paths: list[str],
             extractors: Extractors | None = None) -> dict[str, Any]:
    """``{"reason": str|None, "hits": {path: {"box", "mask_rle", "mask_size", "dense_score"}}}``."""
    ds = source.dataset
    inst = ds.instances[instance]
    masks = [ds.read_mask(p) for p in inst.train]
    if not any(m is not None and np.asarray(m).any() for m in masks):
        return {"reason": f"{instance} has no train masks (train_masks/): no boxes or masks", "hits": {}}
    if extractors is None:
        keys = {t.instance: t.adapter_key for t in source.targets}
        extractors = Extractors(source, [ModelSpec(model, None if model == "pretrained" else keys[model])],
                                share_trunk=False)
    tf = eval_transform(source.backbone, size=source.settings.evaluation.dense_input_size,
                        center_crop=False)

    def dense(img) -> np.ndarray:
        return extractors.dense_features(tf(img).unsqueeze(0), model)[0].numpy()

    with torch.inference_mode():
        reference = build_reference([dense(ds.read_image(p)) for p in inst.train], masks)
        hits: dict[str, dict[str, Any]] = {}
        for path in paths:
            item = load_image(collection, path)
            if item.image is None:
                continue
            size = (item.image.height, item.image.width)
            pred = predict(dense(item.image), size, reference)
            hits[path] = {"box": list(pred.box) if pred.box is not None else None,
                          "mask_rle": _rle_text(pred.mask) if pred.box is not None else None,
                          "mask_size": [size[0], size[1]],
                          "dense_score": None if pred.box is None else float(pred.score)}
    return {"reason": None, "hits": hits}


def localize_many(source, collection: Collection, jobs: list[tuple[str, str, list[str]]]) -> list[dict[str, Any]]:
    """:func:`localize` for several (model, instance, paths) jobs on one loaded backbone."""
    keys = {t.instance: t.adapter_key for t in source.targets}
    models = sorted({m for m, _, _ in jobs})
    extractors = Extractors(source, [ModelSpec(m, None if m == "pretrained" else keys[m]) for m in models],
                            share_trunk=False)
    return [localize(source, collection, m, inst, paths, extractors) for m, inst, paths in jobs]
