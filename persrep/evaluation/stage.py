"""Evaluate a backbone (pretrained, or one adapter per instance) on a data set: tidy rows.

Joins the data layout, the model registry and the suite. The pools follow the paper's protocol
(../shared/docs/REFERENCE.md, not in this repository):

- global pool: the test images of *every* instance of the data set (not only the evaluated
  ones); retrieval gallery: the train images of every instance;
- dense pool: ``test_dense`` where the data set has it, else the test images (documented
  deviation for data sets without a dense split), masks required.

A pretrained backbone embeds each pool once (cached by key) for all instances; a personalised
backbone is instance-specific, so each adapter embeds the pools for its own instance.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from persrep.config import BackboneSettings, EvaluationSettings, content_key
from persrep.data.layout import InstanceDataset
from persrep.evaluation.cache import EmbeddingCache, StreamedDenseFeatures, image_list_key
from persrep.evaluation.features import WithGlobalFeature
from persrep.evaluation.suite import (GlobalPool, dense_train_sets, embed_global_pool,
                                      evaluate_instance)
from persrep.evaluation.dense_task import DensePool
from persrep.evaluation.tasks import dense_tasks
from persrep.models.backbones import build_backbone, eval_transform
from persrep.models.blend import BlendedExtractor
from persrep.models.lora import load_adapter


def default_targets(backbone: Any) -> list[str] | None:
    """The layers a default adapter would touch (the pretrained model's shareable prefix)."""
    from persrep.models.errors import AdapterFormatError
    from persrep.models.lora import default_lora_targets

    try:
        return default_lora_targets(backbone)
    except AdapterFormatError:
        return None


class LazyImages(Sequence):
    """Images of a data set, read and transformed on access (the cache batches them)."""

    def __init__(self, ds: InstanceDataset, rels: list[str], transform: Callable):
        self.ds, self.rels, self.transform = ds, rels, transform

    def __len__(self) -> int:
        return len(self.rels)

    def __getitem__(self, i: int) -> torch.Tensor:  # type: ignore[override]
        return self.transform(self.ds.read_image(self.rels[i]))


class OnDemandDense(Sequence):
    """Dense features computed only for the indices asked for (an adapter needs its own
    instance's 3 train images, not the whole gallery), one image at a time, memoised."""

    def __init__(self, extractor: Any, images: Sequence):
        self.extractor, self.images, self._memo = extractor, images, {}

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        if i not in self._memo:
            with torch.inference_mode():
                out = self.extractor.dense_features(self.images[i].unsqueeze(0))[0]
            self._memo[i] = torch.nn.functional.normalize(out.float(), dim=0).numpy()
        return self._memo[i]


@dataclass
class Pools:
    """Which images make up each pool, with labels (index into ``names``), scenes and masks."""

    names: list[str]
    categories: list[str]
    test: list[str]
    test_labels: np.ndarray
    test_scenes: np.ndarray | None
    train: list[str]
    train_labels: np.ndarray
    dense: list[str]
    dense_labels: np.ndarray
    dense_split: str

    @classmethod
    def of(cls, ds: InstanceDataset) -> "Pools":
        names = ds.names
        idx = {n: i for i, n in enumerate(names)}
        test = ds.test_pool("test")
        train = [(n, p) for n in names for p in ds.instances[n].train]
        dense_split = "test_dense" if any(ds.instances[n].test_dense for n in names) else "test"
        dense = ds.test_pool(dense_split)
        scenes = None
        if ds.scenes:
            scenes = np.asarray([ds.scene_of(p) or "unknown" for _, p in test])
        return cls(names, [ds.instances[n].category for n in names],
                   [p for _, p in test], np.asarray([idx[n] for n, _ in test]), scenes,
                   [p for _, p in train], np.asarray([idx[n] for n, _ in train]),
                   [p for _, p in dense], np.asarray([idx[n] for n, _ in dense]), dense_split)


class Evaluator:
    """Evaluates backbones on one data set; pools are embedded through one shared cache."""

    def __init__(self, ds: InstanceDataset, ev: EvaluationSettings, cache_dir: str | Path | None = None,
                 progress: Callable[[str, int, int], None] | None = None):
        self.ds, self.ev = ds, ev
        self.pools = Pools.of(ds)
        self.cache = EmbeddingCache(cache_dir, batch_size=ev.batch_size, progress=progress)
        self.dense_tasks = dense_tasks(ev.tasks)
        self._dense_masks: list[np.ndarray | None] | None = None
        self.last_examples: dict[str, Any] = {}  # the last evaluation's examples, by instance
        self._train_masks: list[np.ndarray | None] | None = None
        self._prefix: tuple[Any, int] | None = None  # (backbone, split) while its pools are embedded

    # -- inputs ---------------------------------------------------------------------------------
    def _dense_gt(self) -> tuple[list[np.ndarray | None], list[np.ndarray | None]]:
        if self._dense_masks is None:
            self._dense_masks = [self.ds.read_mask(p) for p in self.pools.dense]
            self._train_masks = [self.ds.read_mask(p) for p in self.pools.train]
        return self._dense_masks, self._train_masks  # type: ignore[return-value]

    def _image_sizes(self, rels: list[str]) -> np.ndarray:
        return np.asarray([self.ds.read_image(p).size[::-1] for p in rels])

    def _images(self, rels: list[str], tf: Callable, tf_key: str, list_key: str) -> Sequence:
        """The pool's model inputs: transformed images, or with a frozen prefix (``self._prefix``)
        its activations, computed once per process (persrep.evaluation.prefix_pool)."""
        images = LazyImages(self.ds, rels, tf)
        if self._prefix is None:
            return images
        from persrep.evaluation.prefix_pool import prefix_activations

        base, split = self._prefix
        return prefix_activations(base, split, images, list_key, tf_key, self.ev.batch_size)

    def _extractor(self, backbone: Any, targets: list[str] | None = None) -> Any:
        """The feature extractor of ``backbone``; sets ``self._prefix`` when the tail-only path
        applies (``evaluation.prefix_cache``, a CNN whose LoRA leaves a frozen prefix)."""
        self._prefix = None
        if self.ev.prefix_cache:
            from persrep.evaluation.prefix_pool import TailExtractor, usable_split

            split = usable_split(backbone, self.ev.dense_features, targets)
            if split is not None:
                self._prefix = (backbone, split)
                return TailExtractor(backbone, split, self.ev.global_feature, self.ev.dense_features)
        return WithGlobalFeature(backbone, self.ev.global_feature, self.ev.dense_features)

    def _pretrained_like(self, extractor: Any, bs: BackboneSettings) -> Any:
        """The pretrained backbone's extractor taking the same inputs as ``extractor`` (images,
        or the shared prefix's activations when ``extractor`` runs the tail only)."""
        base = build_backbone(bs).eval()
        if self._prefix is not None:
            from persrep.evaluation.prefix_pool import TailExtractor

            return TailExtractor(base, self._prefix[1], self.ev.global_feature, self.ev.dense_features)
        return WithGlobalFeature(base, self.ev.global_feature, self.ev.dense_features)

    def _size_key(self) -> list[Any]:
        """The global input size in cache keys, when it is not the backbone's own."""
        size = self.ev.global_input_size
        return [("global_input_size", size)] if size else []

    def _global_pool(self, extractor: Any, key: str, bs: BackboneSettings) -> GlobalPool:
        tf = eval_transform(bs, size=self.ev.global_input_size)  # None: the backbone's own image_size
        p = self.pools
        tkey = content_key("global", bs, *self._size_key())
        test_key = image_list_key([self.ds.listing_key, *p.test])
        train_key = image_list_key([self.ds.listing_key, *p.train])
        return embed_global_pool(
            self.cache, extractor, key,
            self._images(p.test, tf, tkey, test_key), p.test_labels, test_key,
            self._images(p.train, tf, tkey, train_key), p.train_labels, train_key,
            p.test_scenes)

    def _dense_inputs(self, extractor: Any, key: str, bs: BackboneSettings, shared: bool):
        if not self.dense_tasks:
            return None, None
        masks, train_masks = self._dense_gt()
        if not any(m is not None for m in masks):
            return None, None  # the suite records "skipped: no dense pool" with its reason
        tf = eval_transform(bs, size=self.ev.dense_input_size, center_crop=False)
        p = self.pools
        tkey = content_key("dense", bs, self.ev.dense_input_size)
        dense_imgs = self._images(p.dense, tf, tkey, image_list_key([self.ds.listing_key, "dense", *p.dense]))
        train_imgs = self._images(p.train, tf, tkey, image_list_key([self.ds.listing_key, "dense", *p.train]))
        if shared:  # pretrained: cache the dense pool once for every instance
            feats = self.cache.dense_features(extractor, key, dense_imgs,
                                              image_list_key([self.ds.listing_key, "dense", *p.dense]))
            train_feats = self.cache.dense_features(extractor, key, train_imgs,
                                                    image_list_key([self.ds.listing_key, "dense", *p.train]))
        else:  # per adapter: stream the pool once; embed only the train images it needs
            feats = StreamedDenseFeatures(extractor, dense_imgs, self.ev.batch_size)
            train_feats = OnDemandDense(extractor, train_imgs)
        pool = DensePool(feats, p.dense_labels, self._image_sizes(p.dense), masks)
        return pool, dense_train_sets(train_feats, p.train_labels, train_masks)

    def _examples(self, i: int, gpool, dpool, dtrain) -> dict[str, Any]:
        """Concrete predictions for the report's gallery (persrep.evaluation.examples)."""
        from persrep.evaluation.examples import dense_examples, retrieval_examples

        p = self.pools
        out: dict[str, Any] = {}
        if "retrieval" in self.ev.tasks and gpool is not None:
            out["retrieval"] = retrieval_examples(gpool.test_embeddings, gpool.test_labels, p.test,
                                                  gpool.train_embeddings, gpool.train_labels, p.train, i)
        if dpool is not None and dtrain is not None:
            out["dense"] = dense_examples(dpool, p.dense, dtrain(i), i)
        return out

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate_pretrained(self, bs: BackboneSettings, instances: list[str],
                            keys: dict[str, Any]) -> list[dict[str, Any]]:
        backbone = build_backbone(bs).eval()
        extractor = self._extractor(backbone, default_targets(backbone))
        key = content_key("pretrained", bs, self.ev.global_feature, self.ev.dense_features, *self._size_key())
        gpool = self._global_pool(extractor, key, bs)
        dpool, dtrain = self._dense_inputs(extractor, key, bs, shared=True)
        return self._rows(instances, gpool, dpool, dtrain, {**keys, "model": "pretrained"})

    def evaluate_adapter(self, bs: BackboneSettings, instance: str, adapter_path: str | Path,
                         keys: dict[str, Any]) -> list[dict[str, Any]]:
        scale, share = self.ev.adapter_scale, self.ev.pretrained_share
        backbone = load_adapter(build_backbone(bs), adapter_path, scale).eval()
        extractor = self._extractor(backbone)
        if share > 0:  # blended with the pretrained global feature (persrep/models/blend.py)
            extractor = BlendedExtractor(extractor, self._pretrained_like(extractor, bs), share)
        key = content_key("adapter", bs, self.ev.global_feature, str(keys.get("adapter_key", adapter_path)),
                          self.ev.dense_features, *([scale] if scale != 1.0 else []),
                          *([("pretrained_share", share)] if share > 0 else []), *self._size_key())
        gpool = self._global_pool(extractor, key, bs)
        dpool, dtrain = self._dense_inputs(extractor, key, bs, shared=False)
        # which model scored: named in the rows (and the report's per-instance table) when blended
        used = {"model_used": f"adapter + pretrained (share {share:g})"} if share > 0 else {}
        rows = self._rows([instance], gpool, dpool, dtrain, {**keys, **used, "model": "personalised"})
        self.cache.forget(key)  # an adapter's pool embeddings are never reused
        return rows

    def _rows(self, instances, gpool, dpool, dtrain, keys) -> list[dict[str, Any]]:
        p = self.pools
        rows: list[dict[str, Any]] = []
        self.last_examples = {"keys": {k: keys.get(k) for k in ("model", "backbone", "data_config",
                                                               "adapter_key")}, "instances": {}}
        for name in instances:
            i = p.names.index(name)
            self.last_examples["instances"][name] = self._examples(i, gpool, dpool, dtrain)
            rows += evaluate_instance(i, name, p.categories[i], global_pool=gpool,
                                      dense_pool=dpool, dense_train=dtrain(i) if dtrain else None,
                                      tasks=self.ev.tasks,
                                      keys={**keys, "global_feature": self.ev.global_feature,
                                            "dense_split": p.dense_split})
        return rows
