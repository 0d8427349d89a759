"""Synthesis (stage 5 of 7): one unit per group of rows drawn with one loaded generator (a
(data configuration, instance) group of positives, or a (negatives pool, category) group),
published as parquet shards under ``<root>/synthesis/<key>/``. The Ray executor runs this stage on
a Ray Data actor pool (``persrep.distributed.synthesis``) with the same bodies: :func:`open_sampler`,
:func:`unit_scorer`, :func:`draw_chunk`, :func:`synthesis_outcome`.

Honest units: what a published unit's output may be used for (:func:`synthesis_verdict`), and
the error when it may not (:class:`persrep.pipeline.units.UnitRejected`).

A synthesis unit is published whatever it drew: its rows are data (every filter attempt with its
score, every row error), and its manifest counts them (:func:`persrep.generation.shards.unit_counts`).
Whether those rows may be *used* is decided here, from the counts and the current settings, every
time the unit is used (when it is drawn, when a re-run finds it published, when an adapter reads
it). So a stricter or looser policy applies at once, without regenerating anything, and a unit
never does something other than what its settings name without saying so:

- more rows that failed to generate than ``synthesis.max_row_errors`` (default 0: any row error
  that survived the row's own retry) -> **failed**, the first error in one line, every distinct
  error in the unit's manifest and each row's error in its shards;
- a positives unit that kept fewer than ``synthesis.filter.min_kept_fraction`` of its requested
  images (filter too strict, generator too poor, rows lost) -> **failed** by default
  (``synthesis.filter.on_empty=fail``), or, when the user allowed it (``on_empty=real_only``), a
  **fallback**: the adapter trains on the real photos and its record, its result rows
  (``positives_used=real_only_fallback``), the summary and the report say so;
- a negatives unit with no image at all -> **failed** (there is no honest substitute).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from persrep.config import content_key
from persrep.generation import shards
from persrep.generation.base import SampleRow, Sampler, generator_class, generator_for, synthesis_key_settings
from persrep.generation.plan import NEGATIVE_GENERATOR, RowGroup, build_groups
from persrep.generation.shards import publish_unit, record
from persrep.keys import result_settings
from persrep.pipeline.context import RunContext
from persrep.pipeline.executor import Outcome, StageOutcomes
from persrep.pipeline.instance_data import instance_data, scratch_dir
from persrep.pipeline.planned import PlannedStage, StageScope
from persrep.pipeline.shared_images import BACKGROUNDS, backgrounds_unit
from persrep.pipeline.stages.captions import llm_captions
from persrep.pipeline.stages.generator_prep import load_artifact
from persrep.pipeline.units import Unit, UnitRejected

FIX_ERRORS = ("the errors are in the unit's manifest and its shard rows; fix their cause, or allow "
              "some with synthesis.max_row_errors")
FIX_FILTER = ("lower synthesis.filter.threshold, raise synthesis.filter.max_attempts_per_image, or "
              "set synthesis.filter.on_empty=real_only to train such instances on their real photos (labelled)")



# -- the verdict on a published unit ---------------------------------------------------------------
@dataclass(frozen=True)
class Verdict:
    status: Literal["ok", "fallback", "failed"]
    line: str = ""  # one line, naming the numbers and the fix (empty when ok)
    details: dict[str, Any] = field(default_factory=dict)

    def raise_if_failed(self, label: str = "") -> "Verdict":
        if self.status == "failed":
            raise UnitRejected(f"{label}: {self.line}" if label else self.line, self.details)
        return self


def _scores(meta: dict[str, Any]) -> str:
    s = meta.get("filter_scores")
    if not s:
        return "no scores"
    return f"scores min {s['min']:.3f} / median {s['median']:.3f} / max {s['max']:.3f} over {s['n']} attempts"


def synthesis_verdict(meta: dict[str, Any], settings: Any) -> Verdict:
    """The verdict on a synthesis unit from its manifest ``meta`` (its counts) and ``settings``."""
    syn = settings.synthesis
    requested = int(meta.get("requested", meta.get("rows", 0)))
    kept, errors = int(meta.get("kept", 0)), int(meta.get("errors", 0))
    negatives = meta.get("generator") == "base"
    details = {k: meta[k] for k in ("group", "generator", "instance", "rows", "requested", "kept", "errors",
                                    "error_messages", "filter_scores") if k in meta}
    if errors > syn.max_row_errors:
        first = (meta.get("error_messages") or ["?"])[0]
        return Verdict("failed", f"{errors} of {requested} rows failed to generate (synthesis.max_row_errors="
                                 f"{syn.max_row_errors}); first: {first}; {FIX_ERRORS}", details)
    if negatives:
        if requested and kept == 0:
            return Verdict("failed", f"no negative image drawn out of {requested}", details)
        return Verdict("ok", "", details)
    flt = syn.filter
    need = flt.min_kept_fraction * requested
    if requested and (kept < need or kept == 0):
        filtered = meta.get("filter_scores") is not None
        what = (f"filter kept {kept} of {requested} requested positives (min {flt.min_kept_fraction:g} "
                f"of them, threshold {flt.threshold:g}; {_scores(meta)})" if filtered else
                f"{kept} of {requested} requested positives drawn (min {flt.min_kept_fraction:g} of them)")
        if flt.on_empty == "real_only":
            return Verdict("fallback", f"{what}; trained on the real photos instead "
                                       "(synthesis.filter.on_empty=real_only)", details)
        return Verdict("failed", f"{what}: {FIX_FILTER}", details)
    return Verdict("ok", "", details)


# -- units, keys, planning -------------------------------------------------------------------------
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


def synthesis_unit(ctx: RunContext, group: RowGroup, rows: list, ready: dict[tuple[str, str], str]
                   ) -> SynthesisUnit | None:
    """The synthesis unit of one row group, keyed; None when it has none (real positives, or its
    trained generator is not in ``ready``: it failed)."""
    settings = ctx.settings
    if group.is_negatives:
        generator, owner, gkey, sampler = NEGATIVE_GENERATOR, rows[0].instance, None, {}
    else:
        generator, owner = group.config.generator, group.owner
        cls = generator_class(generator)
        caps = cls.capabilities
        if caps.positives_are_real:
            return None  # real-only positives are the real photos themselves, augmented in training
        gkey = ready.get((generator, owner)) if caps.trains_per_instance else None
        if caps.trains_per_instance and gkey is None:
            return None  # its generator failed: recorded in generator_prep
        sampler = synthesis_key_settings(generator, settings)
        if BACKGROUNDS in caps.shared_inputs:
            shared = backgrounds_unit(settings, ctx.instances[owner])
            if shared is not None:  # generated backgrounds: their unit's key is an input
                sampler = {**sampler, "backgrounds_key": shared.key}
    return SynthesisUnit(group, generator, owner, rows, gkey,
                         synthesis_key(ctx, group, rows, gkey, sampler))


def plan_synthesis_units(ctx: RunContext, ready: dict[tuple[str, str], str]) -> list[SynthesisUnit]:
    """Synthesis's units: one per group of rows (a generator loaded once per group); groups whose
    trained generator is not in ``ready`` are left out (their generator failed)."""
    generated_negatives = ctx.settings.personalization.negatives == "generated"
    units = []
    for group, rows in build_groups(ctx.settings, ctx.instances, llm_captions(ctx)).items():
        if group.is_negatives and not generated_negatives:
            continue
        unit = synthesis_unit(ctx, group, rows, ready)
        if unit is not None:
            units.append(unit)
    return units


# -- computing one unit (both paths) --------------------------------------------------------------
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
    rows may not be used (:func:`synthesis_verdict`). One body for every synthesis path."""
    meta = meta if meta is not None else ctx.storage.manifest(shards.STAGE, key).meta
    verdict = synthesis_verdict(meta, ctx.settings).raise_if_failed(group)
    counts = {k: meta[k] for k in ("rows", "requested", "kept", "errors", "filter_scores", "seconds") if k in meta}
    return {"status": status, "key": key, **counts, "verdict": verdict.status,
            **({"note": verdict.line} if verdict.line else {})}


def run_synthesis_unit(ctx: RunContext, unit: SynthesisUnit) -> dict[str, Any]:
    """Sample one group of rows (one generator loaded once for all of them); publish shards.

    Raises :class:`~persrep.pipeline.units.UnitRejected` (not retried) when the published rows
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


# -- what the stage adds to the summary ------------------------------------------------------------
def record_synthesis(summary: Any, units: list[Any], outs: list[Outcome], say: Callable[[str], None]) -> None:
    """Per synthesis unit: requested / kept / row errors and the filter's score distribution
    (summary.json ``synthesis_units``, MLflow), and one line per unit trained on a fallback."""
    for u, o in zip(units, outs):
        v = o.value
        if "requested" not in v:
            continue
        scores = v.get("filter_scores")
        summary.synthesis_units.append({"unit": u.group, "status": o.status, "requested": v["requested"],
                                        "kept": v.get("kept", 0), "errors": v.get("errors", 0),
                                        "kept_fraction": round(v.get("kept", 0) / v["requested"], 4)
                                        if v["requested"] else None, "filter_scores": scores,
                                        "verdict": v.get("verdict", "failed" if o.status == "failed" else "ok")})
        if v.get("verdict") == "fallback":
            say(f"FALLBACK synthesis {u.group}: {v.get('note', '')}")
    filtered = [r for r in summary.synthesis_units if r["filter_scores"]]
    if filtered:
        fr = [r["kept_fraction"] for r in filtered if r["kept_fraction"] is not None]
        lo = min((r["filter_scores"]["min"] for r in filtered))
        hi = max((r["filter_scores"]["max"] for r in filtered))
        summary.notes.append(f"filter: {len(filtered)} positives units kept {min(fr):.0%}-{max(fr):.0%} of "
                             f"their requested images (scores {lo:.3f}..{hi:.3f}; per unit in summary.json)")


def planned(scope: StageScope) -> PlannedStage:
    """Synthesis: one unit per group of rows whose generator exists (``scope.ready``); records in
    ``scope.synthesized`` the units that exist for personalisation's planner."""
    def report(units: list[SynthesisUnit], outs: list[Outcome]) -> None:
        st = outs.stats if isinstance(outs, StageOutcomes) else None
        if st:
            scope.summary.notes.append(f"synthesis: {st['rows']} rows, {st['errors']} row errors, "
                                       f"{st['loads']} generator loads on {st['actors']} actor(s)")
        scope.synthesized.update({u.group: u.key for u, o in zip(units, outs) if o.status != "failed"})
        record_synthesis(scope.summary, units, outs, scope.progress)

    return PlannedStage("synthesis", lambda: plan_synthesis_units(scope.ctx, scope.ready), run_synthesis_unit,
                        lambda u: u.label, report=report, always=True,
                        available=lambda done: scope.synthesized.update({u.group: u.key for u in done}))
