"""Personalisation (stage 6 of 7): one LoRA adapter per (instance, data configuration, backbone)
whose data exists, trained contrastively on the instance's photos (anchors), its positives (a
synthesis unit, or the real photos) and its negatives, and published under
``<root>/adapters/<key>/`` (weights + metrics). The Ray executor runs this stage as one Ray Tune
trial per unit (``persrep.distributed.tune_stage``) calling :func:`run_personalize_unit`; each
trained adapter gets a nested MLflow run.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from PIL import Image

from persrep.config import BackboneSettings, content_key
from persrep.data.layout import is_image_name
from persrep.generation import shards
from persrep.generation.base import generator_caps
from persrep.generation.plan import POSITIVES, DataConfig, RowGroup, data_configs
from persrep.generation.shards import read_unit
from persrep.keys import result_settings
from persrep.pipeline.context import RunContext
from persrep.pipeline.executor import Outcome
from persrep.pipeline.instance_data import instance_data, scratch_dir
from persrep.pipeline.planned import PlannedStage, StageScope
from persrep.pipeline.stages.auto_masks import masks_identity, needs_auto_masks
from persrep.pipeline.stages.synthesis import synthesis_outcome, synthesis_verdict
from persrep.pipeline.units import ADAPTERS, Unit, UnitRejected
from persrep.storage import Storage


@dataclass(frozen=True, eq=False)
class PersonalizeUnit(Unit):
    instance: str
    category: str
    config: DataConfig
    backbone: BackboneSettings
    positives_key: str | None  # synthesis unit (None: real-only positives)
    negatives_keys: list[str]  # synthesis units of generated negatives
    key: str = ""
    positives_fallback: bool = False  # its positives unit kept too few: real photos (on_empty=real_only)

    @property
    def label(self) -> str:
        return f"{self.config.label}:{self.backbone.name}:{self.instance}"

    def keyed(self, ctx: RunContext) -> "PersonalizeUnit":
        """This unit with its key (:func:`personalize_key`)."""
        return replace(self, key=personalize_key(ctx, self))


def personalize_key(ctx: RunContext, u: PersonalizeUnit) -> str:
    pz = result_settings(ctx.settings.personalization, "personalization")
    pz.pop("backbones")
    extra = ["real_only_fallback"] if u.positives_fallback else []  # never shares a synthetic one's key
    # context negatives come from the masks: predicted ones enter by their segmenter (given ones are
    # in dataset_key)
    if ctx.settings.personalization.hard_negatives.context and needs_auto_masks(ctx, u.instance):
        extra.append(masks_identity(ctx))
    return content_key("adapter", pz, u.backbone, u.config.key, u.positives_key, u.negatives_keys,
                       ctx.dataset_key, u.instance, *extra)


def _folder_images(ctx: RunContext, location: str, category: str) -> list[bytes]:
    st = Storage(ctx.resolve_data_path(location), ctx.settings.storage.s3_endpoint)
    files = [f for f, _ in st.list_files() if is_image_name(f.rsplit("/", 1)[-1])]
    own = [f for f in files if f.startswith(f"{category}_negatives/")]
    if not files:
        raise ValueError(f"personalization.external_negatives={location}: no images found")
    return [st.read_bytes(f) for f in (own or files)]


def negatives_for(ctx: RunContext, u: PersonalizeUnit) -> tuple[list[bytes | Image.Image], str]:
    pz = ctx.settings.personalization
    if pz.negatives == "generated":
        imgs = [b for k in u.negatives_keys for b in shards.images_of(read_unit(ctx.storage, k))]
        return imgs, "generated"
    if pz.negatives == "external":
        return _folder_images(ctx, pz.external_negatives or "", u.category), "external"
    ds = ctx.dataset  # in_pool: other evaluated instances' photos (leaks; flagged in results)
    return [ds.read_image(p) for n in ds.names if n != u.instance for p in ds.instances[n].train], "in_pool"


def training_data(ctx: RunContext, u: PersonalizeUnit):
    """A unit's anchors, positives and negatives (single-process and data-parallel training)."""
    from persrep.contrastive.train import TrainingData

    inst = instance_data(ctx, u.instance)
    anchors = inst.train_images
    # real-only: the positives *are* the real photos (augmentation makes them differ from the anchor)
    positives, source = list(anchors), "real"
    if u.positives_key:
        verdict = synthesis_outcome(ctx, f"positives of {u.config.label}:{u.instance}", u.positives_key,
                                    "skipped")["verdict"]  # raises UnitRejected when unusable
        if verdict == "fallback":  # allowed by synthesis.filter.on_empty=real_only, and labelled
            source = "real_only_fallback"
        else:
            positives, source = shards.images_of(read_unit(ctx.storage, u.positives_key)), "synthetic"
    negatives, neg_source = negatives_for(ctx, u)
    if not negatives and ctx.settings.personalization.negatives == "generated":
        raise UnitRejected(f"{u.instance}: the generated negatives units {u.negatives_keys} hold no image")
    masks = inst.train_masks if ctx.settings.personalization.hard_negatives.context else None
    return TrainingData(u.instance, anchors, positives, negatives, source, neg_source, masks)


def run_personalize_unit(ctx: RunContext, u: PersonalizeUnit,
                         progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train and publish one adapter; ``progress`` is called after every training step
    (``train_one_instance``): the Tune stage reports it and surfaces its checkpoints."""
    from persrep.contrastive.train import train_one_instance

    if ctx.storage.is_intact(ADAPTERS, u.key):
        return {"status": "skipped", "key": u.key}
    from persrep.pipeline.unit_stats import measure

    cost: dict[str, Any] = {}  # seconds + peak RSS in the trial's process (Tune path; summary.json costs)
    with measure(cost):
        data = training_data(ctx, u)
        work = scratch_dir(ctx, "train", u.key)
        res = train_one_instance(ctx.settings.personalization, u.backbone, data, work, progress=progress)
    metrics = {k: v for k, v in res.metrics.items() if k != "loss_history"}
    publish_adapter(ctx, u, res.adapter_path.read_bytes(), metrics, res.metrics["loss_history"],
                    res.seconds, res.resumed_from)
    shutil.rmtree(work, ignore_errors=True)
    return {"status": "done", "key": u.key, "seconds": res.seconds, **metrics, **cost}


def publish_adapter(ctx: RunContext, u: PersonalizeUnit, adapter: bytes, metrics: dict[str, Any],
                    loss_history: list[float], seconds: float, resumed_from: int) -> None:
    """Publish one trained adapter (weights + metrics.json, manifest last): one body for
    single-process and data-parallel training, so evaluation cannot tell them apart."""
    from persrep.contrastive.train import ADAPTER

    meta = {"instance": u.instance, "data_config": u.config.label, "backbone": u.backbone.name,
            "metrics": metrics, "seconds": seconds, "resumed_from": resumed_from}
    ctx.storage.publish(ADAPTERS, u.key, {
        ADAPTER: adapter, "metrics.json": json.dumps({**meta, "loss_history": loss_history}).encode()}, meta)


def plan_personalize_units(ctx: RunContext, synthesized: dict[str, str]) -> list[PersonalizeUnit]:
    """Personalisation's units: one per (data configuration, instance, backbone) whose data exists."""
    settings = ctx.settings
    negatives: dict[str, list[str]] = {}  # category -> its negatives pools' synthesis keys
    for g, k in synthesized.items():
        if g.is_negatives:
            negatives.setdefault(g.owner, []).append(k)
    pz_units: list[PersonalizeUnit] = []
    for cfg in data_configs(settings):
        for name in sorted(ctx.instances):
            cat = ctx.instances[name]
            pos_key, fallback = None, False
            if not generator_caps(cfg.generator).positives_are_real:
                pos_key = synthesized.get(str(RowGroup(POSITIVES, name, config=cfg)))
                if pos_key is None:
                    continue
                verdict = synthesis_verdict(ctx.storage.manifest(shards.STAGE, pos_key).meta, settings)
                if verdict.status == "failed":
                    continue  # reported by the synthesis stage (or the sweep's data phase)
                fallback = verdict.status == "fallback"
            neg_keys = negatives.get(cat, [])
            if settings.personalization.negatives == "generated" and not neg_keys:
                continue
            for bs in settings.personalization.backbones:
                u = PersonalizeUnit(name, cat, cfg, bs, pos_key, sorted(neg_keys), positives_fallback=fallback)
                pz_units.append(u.keyed(ctx))
    return pz_units


def planned(scope: StageScope) -> PlannedStage:
    """Personalisation: its units from the synthesis units that exist (``scope.synthesized``);
    records in ``scope.adapters`` the units whose adapter exists, one nested MLflow run each."""
    def report(units: list[PersonalizeUnit], outs: list[Outcome]) -> None:
        scope.adapters.extend(u for u, o in zip(units, outs) if o.status != "failed")
        ctx, tracker = scope.ctx, scope.tracker
        for u, o in zip(units, outs):  # one nested MLflow run per trained adapter
            if o.status == "done" and tracker is not None:
                tracker.child_run(o.label, {"instance": u.instance, "data_config": u.config.label,
                                            "backbone": u.backbone.name, "adapter_key": u.key},
                                  {k: float(v) for k, v in o.value.items()
                                   if isinstance(v, (int, float)) and not isinstance(v, bool)},
                                  references={"adapter": ctx.storage.uri(ADAPTERS, u.key)},
                                  tags={"persrep.stage": "personalization"})

    return PlannedStage("personalization", lambda: plan_personalize_units(scope.ctx, scope.synthesized),
                        run_personalize_unit, lambda u: u.label, report=report, always=True)
