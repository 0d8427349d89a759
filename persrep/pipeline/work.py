"""One unit of work per function: generator prep, synthesis, personalisation, evaluation.

Each function takes the :class:`RunContext` and a small unit description, skips a unit that is
already published, and otherwise computes it and publishes it atomically to the storage root.
They run the same in-process, in a Ray task or in a Tune trial: no Ray here.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image

from persrep.config import BackboneSettings, content_key
from persrep.data.layout import is_image_name
from persrep.generation.base import (GeneratorArtifact, InstanceData, Sampler, SampleRow, generator_class,
                                     generator_for, get_generator)
from persrep.generation.plan import NEGATIVE_GENERATOR, DataConfig
from persrep.generation.shards import publish_unit, read_unit, record
from persrep.generation import shards
from persrep.pipeline.context import RunContext
from persrep.pipeline.units import Unit
from persrep.keys import result_settings
from persrep.pipeline.verdict import UnitRejected, synthesis_verdict
from persrep.storage import Storage

GENERATORS, ADAPTERS, EVALUATIONS = "generators", "adapters", "evaluations"


# -- helpers ------------------------------------------------------------------------------------
def instance_data(ctx: RunContext, name: str) -> InstanceData:
    ds = ctx.dataset
    inst = ds.instances[name]
    images = [ds.read_image(p) for p in inst.train]
    masks = None
    if all(p in ds.masks for p in inst.train):
        masks = [Image.fromarray(ds.read_mask(p).astype("uint8") * 255, mode="L") for p in inst.train]
    elif ctx.settings.generator.auto_masks:  # predicted masks: a keyed unit (pipeline/auto_masks.py)
        from persrep.pipeline.auto_masks import auto_masks_for

        masks = auto_masks_for(ctx, name, images)
    return InstanceData(name, inst.category, images, masks)


def scratch_dir(ctx: RunContext, *parts: str) -> Path:
    """Local scratch space that survives a crash (checkpoints), beside a local root or in ~/.cache."""
    base = Path(ctx.storage.base) / ".scratch" if not ctx.storage.is_s3 else \
        Path.home() / ".cache" / "persrep" / "scratch" / content_key(ctx.storage.root)
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


# -- generator prep -----------------------------------------------------------------------------
def generator_key(ctx: RunContext, gtype: str, name: str) -> str:
    return get_generator(gtype, ctx.settings).artifact_key(instance_data(ctx, name))


@dataclass(frozen=True, eq=False)
class GeneratorUnit(Unit):
    """Generator prep: one (trained generator type, instance)."""

    generator: str
    instance: str
    key: str
    shared_inputs: tuple[str, ...] = ()  # keys of the shared base-image units it reads (class images)

    @property
    def label(self) -> str:
        return f"{self.generator}:{self.instance}"


def run_generator_unit(ctx: RunContext, unit: GeneratorUnit) -> dict[str, Any]:
    """Train a personalised generator for one instance; publish its weights."""
    gtype, name, key = unit.generator, unit.instance, unit.key
    if ctx.storage.is_intact(GENERATORS, key):
        return {"status": "skipped", "key": key}
    t0, started_at = time.perf_counter(), time.time()
    # the type's factory reads what it shares per category (DreamBooth: its class images)
    gen = generator_for(ctx, gtype, ctx.instances[name], "generator_prep")
    artifact = gen.prepare(instance_data(ctx, name), scratch_dir(ctx, "class_images"))
    if artifact.key != key:
        raise RuntimeError(f"{gtype} {name}: artifact key {artifact.key} != planned {key}")
    meta = {"generator": gtype, "instance": name, "settings": artifact.settings.get("settings", {}),
            "seconds": time.perf_counter() - t0, "started_at": started_at, "finished_at": time.time()}
    ctx.storage.publish(GENERATORS, key, artifact.files, meta)
    return {"status": "done", "key": key, "seconds": meta["seconds"]}


def load_artifact(storage: Storage, gtype: str, name: str, key: str) -> GeneratorArtifact:
    man = storage.verify_unit(GENERATORS, key)
    files = {f: storage.read_unit_file(GENERATORS, key, f, man) for f in man.files}
    return GeneratorArtifact(gtype, name, files, man.meta, key)


# -- synthesis ----------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class SynthesisUnit(Unit):
    """One group of rows drawn with one loaded generator. ``group`` is typed
    (:class:`~persrep.generation.plan.RowGroup`: kind, owner, data configuration) and is also the
    group's stored name (a ``str``), so summaries and stored runs read the same."""

    group: str  # a RowGroup where planned; a plain str where rebuilt from a row table (Ray Data)
    generator: str  # a generator type, or "base" for negatives
    instance: str  # instance, or "<category>_negatives"
    rows: list[SampleRow]
    generator_key: str | None
    key: str = ""

    @property
    def label(self) -> str:
        return str(self.group)


def synthesis_key(ctx: RunContext, group: str, rows: list[SampleRow], generator_key: str | None,
                  sampler_settings: dict[str, Any]) -> str:
    syn = ctx.settings.synthesis
    rows_id = [(r.prompt, r.cfg, r.seed, r.index) for r in rows]
    return content_key("synthesis", group, rows_id, generator_key, sampler_settings,
                       {"steps": syn.inference_steps, "scheduler": syn.scheduler,
                        "resolution": syn.resolution, "base": ctx.settings.generator.base_model,
                        "filter": result_settings(syn.filter, "synthesis.filter")})


def open_sampler(ctx: RunContext, unit: SynthesisUnit):
    """What draws a synthesis unit's rows, loaded: the base model for negatives, else the unit's
    generator built by its type's factory (``generator_for``) and loaded with its artifact. One
    body for the in-process loop and the Ray Data actors."""
    if unit.generator == NEGATIVE_GENERATOR:
        from persrep.generation.dreambooth import BaseModelSampler

        return BaseModelSampler(Sampler.of(ctx.settings))
    cls = generator_class(unit.generator)
    gen = generator_for(ctx, unit.generator, ctx.instances[unit.instance], "synthesis")
    if cls.needs_training:
        gen.load(load_artifact(ctx.storage, unit.generator, unit.instance, unit.generator_key or ""))
    else:
        gen.load(gen.prepare(instance_data(ctx, unit.instance), scratch_dir(ctx, "prep")))
    return gen


def unit_scorer(ctx: RunContext, unit: SynthesisUnit):
    """The filter's scorer for a unit's rows, or None (filter off; negatives are never filtered)."""
    syn = ctx.settings.synthesis
    if not syn.filter.enabled or unit.generator == NEGATIVE_GENERATOR:
        return None
    from persrep.generation.filtering import scorer_from_settings

    scorer = scorer_from_settings(syn.filter, instance_data(ctx, unit.instance))
    if syn.filter.segmenter != "none":  # segment each generated image first (PerSAM in the paper)
        from persrep.segmentation.filtering import SegmentingScorer

        scorer = SegmentingScorer.from_settings(scorer, ctx.settings, instance_data(ctx, unit.instance))
    return scorer


def _filtered(sampler, scorer, rows: list[SampleRow], key: str, flt) -> list[dict[str, Any]]:
    """Every attempt becomes a row with its score; rejected attempts keep no pixels."""
    from persrep.generation.filtering import filter_until

    result = filter_until(sampler.sample, scorer, rows, flt.threshold, flt.max_attempts_per_image)
    return [record(a.sample, a.row, key, filter_score=a.score, kept=a.kept) for a in result.attempts]


def draw_chunk(sampler, scorer, rows: list[SampleRow], key: str,
               flt) -> tuple[list[list[dict[str, Any]]], bool]:
    """Draw one sampling chunk: all rows at once (through the filter when ``scorer``), or, when
    that raises, each row alone, so one bad row does not sink its chunk-mates; a row that still
    raises is recorded with its error. Returns (records per part, fell back): one part for the
    whole chunk, or one per row after the fallback. One body for both synthesis paths."""
    def draw(part: list[SampleRow]) -> list[dict[str, Any]]:
        if scorer is not None:
            return _filtered(sampler, scorer, part, key, flt)
        return [record(s, r, key) for s, r in zip(sampler.sample(part), part)]

    try:
        return [draw(rows)], False
    except Exception:  # noqa: BLE001 - retried row by row; failures recorded per row
        parts = []
        for r in rows:
            try:
                parts.append(draw([r]))
            except Exception as row_exc:  # noqa: BLE001
                parts.append([record(None, r, key, error=f"{type(row_exc).__name__}: {row_exc}"[:500])])
        return parts, True


def synthesis_outcome(ctx: RunContext, group: str, key: str, status: str,
                      meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """A published synthesis unit's outcome value (its counts), or :class:`UnitRejected` when its
    rows may not be used (:mod:`persrep.pipeline.verdict`). One body for every synthesis path."""
    meta = meta if meta is not None else ctx.storage.manifest(shards.STAGE, key).meta
    verdict = synthesis_verdict(meta, ctx.settings).raise_if_failed(group)
    counts = {k: meta[k] for k in ("rows", "requested", "kept", "errors", "filter_scores", "seconds") if k in meta}
    return {"status": status, "key": key, **counts, "verdict": verdict.status,
            **({"note": verdict.line} if verdict.line else {})}


def run_synthesis_unit(ctx: RunContext, unit: SynthesisUnit) -> dict[str, Any]:
    """Sample one group of rows (one generator loaded once for all of them); publish shards.

    Raises :class:`~persrep.pipeline.verdict.UnitRejected` (not retried) when the published rows
    may not be used: too many row errors, or a filter that kept too few positives."""
    if ctx.storage.is_intact(shards.STAGE, unit.key):
        return synthesis_outcome(ctx, "", unit.key, "skipped")
    t0 = time.perf_counter()
    sampler = open_sampler(ctx, unit)
    syn = ctx.settings.synthesis
    scorer = unit_scorer(ctx, unit)
    records: list[dict[str, Any]] = []
    for i in range(0, len(unit.rows), syn.batch_size):
        parts, _ = draw_chunk(sampler, scorer, unit.rows[i:i + syn.batch_size], unit.key, syn.filter)
        records += [rec for part in parts for rec in part]
    meta = publish_unit(ctx.storage, unit.key, records, syn.rows_per_shard,
                        {"group": unit.group, "generator": unit.generator, "instance": unit.instance,
                         "seconds": time.perf_counter() - t0})
    return synthesis_outcome(ctx, "", unit.key, "done", meta)


# -- personalisation ----------------------------------------------------------------------------
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
    # a fallback adapter (trained on the real photos) never shares a key with a synthetic one
    return content_key("adapter", pz, u.backbone, u.config.key, u.positives_key, u.negatives_keys,
                       ctx.dataset_key, u.instance, *(["real_only_fallback"] if u.positives_fallback else []))


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

    anchors = instance_data(ctx, u.instance).train_images
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
    return TrainingData(u.instance, anchors, positives, negatives, source, neg_source)


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


# -- evaluation ---------------------------------------------------------------------------------
def _publish_rows(ctx: RunContext, key: str, rows: list[dict[str, Any]], meta: dict[str, Any],
                  extra: dict[str, bytes] | None = None) -> None:
    import pyarrow as pa

    from persrep.evaluation.aggregate import results_frame

    table = pa.Table.from_pandas(results_frame(rows), preserve_index=False)
    ctx.storage.publish(EVALUATIONS, key, {"results.parquet": shards.table_bytes(table), **(extra or {})}, meta)


def read_rows(storage: Storage, key: str) -> list[dict[str, Any]]:
    data = storage.read_unit_file(EVALUATIONS, key, "results.parquet")
    return pq.read_table(io.BytesIO(data)).to_pylist()


def positives_used(adapter_meta: dict[str, Any]) -> dict[str, Any]:
    """What an adapter was really trained on, from its manifest: result-row columns."""
    m = adapter_meta.get("metrics", {})
    return {"positives_used": m.get("positives_source", "unknown"),
            "n_positives": int(m.get("num_positives", -1))}


@dataclass(frozen=True, eq=False)
class EvaluationUnit(Unit):
    """The pretrained backbone on every instance (``kind="pretrained"``), or one adapter on its
    instance (``kind="adapter"``); ``keys`` are the result rows' identifying columns."""

    kind: str  # pretrained | adapter
    backbone: BackboneSettings
    key: str
    keys: dict[str, Any]
    instance: str | None = None
    adapter_key: str | None = None

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.backbone.name}:{self.instance or 'all'}"


def run_evaluation_unit(ctx: RunContext, unit: EvaluationUnit) -> dict[str, Any]:
    """Evaluate the pretrained backbone (all instances) or one adapter (its instance)."""
    from persrep.evaluation.stage import Evaluator

    key = unit.key
    if ctx.storage.is_intact(EVALUATIONS, key):
        return {"status": "skipped", "key": key}
    t0 = time.perf_counter()
    bs: BackboneSettings = unit.backbone
    ev = Evaluator(ctx.dataset, ctx.settings.evaluation)
    if unit.kind == "pretrained":
        rows = ev.evaluate_pretrained(bs, sorted(ctx.instances), unit.keys)
    else:
        from persrep.contrastive.train import ADAPTER

        man = ctx.storage.manifest(ADAPTERS, unit.adapter_key)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / ADAPTER
            path.write_bytes(ctx.storage.read_unit_file(ADAPTERS, unit.adapter_key, ADAPTER, man))
            rows = ev.evaluate_adapter(bs, unit.instance, path, {**unit.keys, **positives_used(man.meta)})
    _publish_rows(ctx, key, rows, {"kind": unit.kind, "backbone": bs.name,
                                   "seconds": time.perf_counter() - t0},
                  {"examples.json": json.dumps(ev.last_examples).encode()})  # the report's gallery
    return {"status": "done", "key": key, "rows": len(rows), "seconds": time.perf_counter() - t0}
