"""The whole job: generator prep -> synthesis -> personalisation -> evaluation -> summary.

Stages run through an executor (in-process, or Ray tasks); every unit is keyed and skipped when
already published, so a re-run after a crash redoes only what is missing. The run's results
land at ``<root>/runs/<run_id>/`` (results.parquet, summary.json, summary.md).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from persrep.config import Settings, content_key, settings_to_dict
from persrep.generation.base import generator_caps, generator_class, synthesis_key_settings
from persrep.generation.plan import NEGATIVE_GENERATOR, POSITIVES, RowGroup, build_groups, data_configs
from persrep.pipeline.captions_stage import llm_captions, plan_caption_units, run_caption_unit
from persrep.pipeline.context import RunContext, prepare_run
from persrep.keys import result_settings
from persrep.pipeline.executor import Executor, LocalExecutor, Outcome, Resources
from persrep.pipeline.memory import count_units, plan_stages, stage_requests
from persrep.generation import shards
from persrep.pipeline.summary import adapterless_line, format_summary, headline_table
from persrep.pipeline.unit_stats import stage_costs, unit_record
from persrep.pipeline.verdict import synthesis_verdict
from persrep.pipeline.stages import PlannedStage, StageRun, map_stage, record_stage, run_planned
from persrep.pipeline.work import (EvaluationUnit, GeneratorUnit, PersonalizeUnit, SynthesisUnit,
                                   generator_key, read_rows, run_evaluation_unit, run_generator_unit,
                                   run_personalize_unit, run_synthesis_unit, synthesis_key)
from persrep.pipeline.executor import stage_hooks

Progress = Callable[[str], None]


@dataclass
class RunSummary:
    run_id: str
    run_uri: str = ""
    stages: dict[str, dict[str, int]] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    retries: list[dict[str, Any]] = field(default_factory=list)  # units that needed > 1 attempt
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    table: str = ""
    rows: list[dict[str, Any]] = field(default_factory=list, repr=False)
    synthesis_units: list[dict[str, Any]] = field(default_factory=list)  # counts + filter scores
    fallbacks: list[dict[str, Any]] = field(default_factory=list)  # adapters not trained as labelled
    traces: dict[str, str] = field(default_factory=dict, repr=False)  # failed unit -> traceback
    units: list[dict[str, Any]] = field(default_factory=list, repr=False)  # units.json: the report's map

    def record(self, stage: str, outcomes: list[Outcome], seconds: float) -> None:
        counts = {"done": 0, "skipped": 0, "failed": 0, "retried": 0}
        for o in outcomes:
            counts[o.status] = counts.get(o.status, 0) + 1
            self.units.append({"stage": stage, "label": o.label, "status": o.status,
                               "key": (o.value or {}).get("key"), "attempts": o.attempts, **unit_record(o)})
            counts["retried"] += o.attempts > 1
            if o.attempts > 1:
                self.retries.append({"stage": stage, "unit": o.label, "attempts": o.attempts, "status": o.status})
            if o.status == "failed":
                self.failures.append({"stage": stage, "unit": o.label, "error": o.error, "attempts": o.attempts,
                                      **({"details": o.value} if o.value else {})})
                self.traces[o.label] = getattr(o, "trace", None) or str(o.error)
        self.stages[stage] = counts
        self.timings[stage] = round(seconds, 2)

    def record_synthesis(self, units: list[Any], outs: list[Outcome], say: Progress) -> None:
        """Per synthesis unit: requested / kept / row errors and the filter's score distribution
        (summary.json ``synthesis_units``, MLflow), and one line per unit trained on a fallback."""
        for u, o in zip(units, outs):
            v = o.value
            if "requested" not in v:
                continue
            scores = v.get("filter_scores")
            self.synthesis_units.append({"unit": u.group, "status": o.status, "requested": v["requested"],
                                         "kept": v.get("kept", 0), "errors": v.get("errors", 0),
                                         "kept_fraction": round(v.get("kept", 0) / v["requested"], 4)
                                         if v["requested"] else None, "filter_scores": scores,
                                         "verdict": v.get("verdict", "failed" if o.status == "failed" else "ok")})
            if v.get("verdict") == "fallback":
                say(f"FALLBACK synthesis {u.group}: {v.get('note', '')}")
        filtered = [r for r in self.synthesis_units if r["filter_scores"]]
        if filtered:
            fr = [r["kept_fraction"] for r in filtered if r["kept_fraction"] is not None]
            lo = min((r["filter_scores"]["min"] for r in filtered))
            hi = max((r["filter_scores"]["max"] for r in filtered))
            self.notes.append(f"filter: {len(filtered)} positives units kept {min(fr):.0%}-{max(fr):.0%} of "
                              f"their requested images (scores {lo:.3f}..{hi:.3f}; per unit in summary.json)")

    @property
    def exit_code(self) -> int:
        return 1 if self.failures else 0


_special_stage = record_stage  # the stage helpers live in persrep.pipeline.stages
_stage = map_stage


def run_pipeline(settings: Settings, progress: Progress | None = None,
                 executor: Executor | None = None, run_id: str | None = None,
                 ctx: RunContext | None = None) -> RunSummary:
    """``ctx``: a context from :func:`prepare_run` (data validated before Ray and MLflow start)."""
    from persrep.tracking import Tracker

    say = progress or (lambda _m: None)
    t_start = time.perf_counter()
    tracker = Tracker.from_settings(settings, say=say).connect()  # required + down: fails here
    ctx = ctx or prepare_run(settings, say, run_id)
    for note in ctx.notes:
        say(note)
    executor = executor or LocalExecutor(settings.resources.max_retries, say)
    lazy = not getattr(executor, "started", True)  # RayExecutor(start=...): its cluster not started yet
    if lazy:  # the plan (and so the cluster) when a unit is left to compute
        executor.before_compute = _once(lambda: plan_resources(ctx, executor, say))
    else:
        plan_resources(ctx, executor, say)
    summary = RunSummary(ctx.run_id, notes=list(ctx.notes))
    if tracker.degraded and tracker.warning:
        summary.notes.append(f"tracking degraded: {tracker.warning}")
    tracker.start_parent(f"{settings.name}-{ctx.run_id}", settings, tags={"persrep.run_id": ctx.run_id})
    try:
        _run_stages(ctx, executor, summary, tracker, say)
    except BaseException:
        tracker.end("FAILED")
        raise
    if lazy and not executor.started:
        say("nothing to compute: every unit was published earlier (no cluster started, no memory plan)")
        summary.notes.append("nothing to compute: every unit was published earlier; no Ray cluster started")
    summary.timings["total"] = round(time.perf_counter() - t_start, 2)
    _write_results(ctx, summary, tracker)
    tracker.end("FINISHED" if not summary.failures else "FAILED")
    for r in summary.retries:
        say(f"RETRIED {r['stage']} {r['unit']}: {r['attempts']} attempts, {r['status']}")
    for f in summary.failures:
        say(f"FAILED {f['stage']} {f['unit']} after {f['attempts']} attempt(s): {f['error']}")
    return summary


def _once(fn: Callable[[], None]) -> Callable[[], None]:
    """``fn`` the first time, nothing after (a failed call is not retried: its error stops the job)."""
    done = []

    def call() -> None:
        if not done:
            done.append(True)
            fn()
    return call


def unit_resources(ctx: RunContext, stage: str) -> Resources:
    """What one unit of ``stage`` reserves: CPUs / GPUs from settings, memory from the plan."""
    res = ctx.settings.resources
    return Resources(cpus=res.cpus_per_trial, gpus=res.gpus_per_trial, memory=ctx.memory.get(stage, 0))


def plan_resources(ctx: RunContext, executor: Executor, say: Progress) -> None:
    """Before compute: estimate each heavy unit's memory (persrep.pipeline.memory), check that it
    fits on some node (else one line, exit 2), print the plan, and record the reservations in
    ``ctx.memory`` for every stage to request."""
    nodes = executor.node_shapes()
    has_gpus = any(n.gpus > 0 for n in nodes)
    on_gpu = has_gpus and ctx.settings.resources.gpus_per_trial > 0
    requests = stage_requests(ctx.settings, has_gpus)
    sequential = getattr(executor, "sequential", False)
    if sequential and nodes:  # one unit at a time in this process: CPU and GPU requests reserve nothing
        most_cpus, most_gpus = max(n.cpus for n in nodes), max(n.gpus for n in nodes)
        requests = {s: (min(c, most_cpus), min(g, most_gpus)) for s, (c, g) in requests.items()}
    counts = count_units(ctx.settings, len(ctx.instances), len(set(ctx.instances.values())))
    plans = plan_stages(ctx.settings, counts, nodes, requests, on_gpu)
    for p in plans:
        say(p.line() if not sequential else p.line().rsplit(";", 1)[0] + "; one at a time (in this process)")
    ctx.memory = {p.stage: p.estimate.bytes for p in plans}


@dataclass
class DataStages:
    """What the data stages made available: trained generators and synthesis units, by key."""
    ready: dict[tuple[str, str], str] = field(default_factory=dict)  # (generator, instance) -> key
    synthesized: dict[str, str] = field(default_factory=dict)        # row group -> synthesis key


def plan_generator_units(ctx: RunContext) -> list[GeneratorUnit]:
    """Generator prep's units: one per (type that trains per instance, instance)."""
    from persrep.pipeline.shared_images import CLASS_IMAGES, class_images_unit

    units = []
    for t in ctx.settings.generator.types:
        caps = generator_caps(t)
        if not caps.trains_per_instance:
            continue
        for n in sorted(ctx.instances):
            # a type that reads its category's class images depends on their shared unit
            shared = class_images_unit(ctx.settings, ctx.instances[n]) if CLASS_IMAGES in caps.shared_inputs else None
            units.append(GeneratorUnit(t, n, generator_key(ctx, t, n), (shared.key,) if shared else ()))
    return units


def synthesis_unit(ctx: RunContext, group: RowGroup, rows: list, ready: dict[tuple[str, str], str]
                   ) -> SynthesisUnit | None:
    """The synthesis unit of one row group, keyed; None when it has none (real positives, or its
    trained generator is not in ``ready``: it failed)."""
    from persrep.pipeline.shared_images import BACKGROUNDS, backgrounds_unit

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


def adapter_eval_unit(ctx: RunContext, u: PersonalizeUnit) -> EvaluationUnit:
    """Evaluation's unit for one adapter (its instance, keyed by adapter + evaluation settings)."""
    return EvaluationUnit(
        "adapter", u.backbone,
        content_key("eval-adapter", u.key, result_settings(ctx.settings.evaluation, "evaluation"), ctx.dataset_key),
        {"backbone": u.backbone.name, "data_config": u.config.label, "generator": u.config.generator,
         "cfg": u.config.cfg if u.config.cfg is not None else float("nan"),
         "caption_source": u.config.caption_source, "adapter_key": u.key,
         "negatives_source": ctx.settings.personalization.negatives},
        instance=u.instance, adapter_key=u.key)


def pretrained_eval_units(ctx: RunContext) -> list[EvaluationUnit]:
    """Evaluation's units for the pretrained backbones (all instances each), when asked for."""
    ev = ctx.settings.evaluation
    if not ev.evaluate_pretrained:
        return []
    common = {"negatives_source": ctx.settings.personalization.negatives}
    # the pretrained backbone has no adapter to scale: evaluation.adapter_scale stays out of its key
    ev_key = {k: v for k, v in result_settings(ev, "evaluation").items() if k != "adapter_scale"}
    return [EvaluationUnit("pretrained", bs, content_key(
        "eval-pretrained", bs, ev_key, ctx.dataset_key, sorted(ctx.instances)),
        {"backbone": bs.name, "data_config": "-", "generator": "-", "cfg": float("nan"),
         "caption_source": "-", "adapter_key": "-", "positives_used": "-", "n_positives": -1, **common})
        for bs in ctx.settings.personalization.backbones]


def data_stages(ctx: RunContext, summary: RunSummary, say: Progress, out: DataStages,
                runs: dict[str, StageRun]) -> list[PlannedStage]:
    """The stages before personalisation, in order: auto masks, captions, base images, generator
    prep, synthesis. Each plans from what the earlier ones made (``runs``, ``out``)."""
    from persrep.pipeline.auto_masks import low_confidence_notes, plan_mask_units, run_mask_unit
    from persrep.pipeline.shared_images import plan_shared_units, run_shared_unit

    def failed(stage: str) -> set[str]:
        return runs[stage].failed_keys() if stage in runs else set()

    def masks_report(units: list[Any], _outs: list[Outcome]) -> None:
        summary.notes.extend(low_confidence_notes(ctx, units))

    def prep_report(units: list[GeneratorUnit], outs: list[Outcome]) -> None:
        out.ready.update({(u.generator, u.instance): u.key for u, o in zip(units, outs) if o.status != "failed"})
        for u, o in zip(units, outs):  # the per-instance status table of generator prep
            say(f"  {u.instance:24s} {u.generator:18s} {o.status:8s} {o.error or ''}")

    def synthesis_report(units: list[SynthesisUnit], outs: list[Outcome]) -> None:
        st = getattr(outs, "stats", None)
        if st:
            summary.notes.append(f"synthesis: {st['rows']} rows, {st['errors']} row errors, "
                                 f"{st['loads']} generator loads on {st['actors']} actor(s)")
        out.synthesized.update({u.group: u.key for u, o in zip(units, outs) if o.status != "failed"})
        summary.record_synthesis(units, outs, say)

    def plan_prep() -> list[GeneratorUnit]:  # a unit whose class images failed cannot run
        return [u for u in plan_generator_units(ctx) if not set(u.shared_inputs) & failed("base_images")]

    return [
        # auto masks (generator.auto_masks): one unit per instance without train masks
        PlannedStage("auto_masks", lambda: plan_mask_units(ctx), run_mask_unit,
                     lambda u: f"masks:{u.instance}", report=masks_report),
        # LLM captions: one unit per category, before the synthesis rows are planned
        PlannedStage("captions", lambda: plan_caption_units(ctx), run_caption_unit,
                     lambda u: f"captions:{u.category}"),
        # base images shared per category (class images, generated backgrounds): drawn once
        PlannedStage("base_images", lambda: plan_shared_units(ctx.settings, ctx.instances), run_shared_unit,
                     lambda u: f"{u.kind}:{u.category}", resources="synthesis"),
        # generator prep: one unit per (instance, trained generator type)
        PlannedStage("generator_prep", plan_prep, run_generator_unit, lambda u: u.label,
                     report=prep_report, always=True,
                     available=lambda done: out.ready.update({(u.generator, u.instance): u.key for u in done})),
        # synthesis: one unit per group of rows (a generator loaded once per group)
        PlannedStage("synthesis", lambda: plan_synthesis_units(ctx, out.ready), run_synthesis_unit,
                     lambda u: u.label, hook="synthesis_stage", how="Ray Data",
                     report=synthesis_report, always=True,
                     available=lambda done: out.synthesized.update({u.group: u.key for u in done})),
    ]


def run_data_stages(ctx: RunContext, executor: Executor, summary: RunSummary, say: Progress,
                    skip_keys: set[str] | None = None) -> DataStages:
    """The stages before personalisation (auto masks, captions, base images, generator prep,
    synthesis). Units whose key is in ``skip_keys`` are not run (a caller that already ran them,
    e.g. a sweep over several data settings, counts them as available); the keys of the units run
    here are added to it."""
    skip = skip_keys if skip_keys is not None else set()
    out = DataStages()
    runs: dict[str, StageRun] = {}
    for stage in data_stages(ctx, summary, say, out, runs):
        runs[stage.name] = run_planned(stage, ctx, executor, summary, say, skip, unit_resources)
    return out


def _run_stages(ctx: RunContext, executor: Executor, summary: RunSummary, tracker: Any,
                say: Progress) -> None:
    # 1-2. the data stages (auto masks, captions, base images, generator prep, synthesis)
    synthesized = run_data_stages(ctx, executor, summary, say).synthesized

    # 3. personalisation: one unit per (instance, data configuration, backbone)
    pz_units = plan_personalize_units(ctx, synthesized)

    pz_labels = [u.label for u in pz_units]
    stage3 = stage_hooks(executor).run_personalization  # RayExecutor: one Tune trial per unit
    if stage3 is not None and pz_units:
        outs = _special_stage(summary, "personalization", "Ray Tune", len(pz_units), say,
                              lambda: stage3(ctx, pz_units, pz_labels, tracker))
    else:
        outs = _stage(summary, executor, "personalization", run_personalize_unit, ctx, pz_units,
                      pz_labels, lambda: unit_resources(ctx, "personalization"), say)
    adapters = [u for u, o in zip(pz_units, outs) if o.status != "failed"]
    for u, o in zip(pz_units, outs):  # one nested MLflow run per trained adapter
        if o.status == "done":
            tracker.child_run(o.label, {"instance": u.instance, "data_config": u.config.label,
                                        "backbone": u.backbone.name, "adapter_key": u.key},
                              {k: float(v) for k, v in o.value.items()
                               if isinstance(v, (int, float)) and not isinstance(v, bool)},
                              references={"adapter": ctx.storage.uri("adapters", u.key)},
                              tags={"persrep.stage": "personalization"})

    # 4. evaluation: pretrained once per backbone (all instances), then each adapter
    ev_units = pretrained_eval_units(ctx) + [adapter_eval_unit(ctx, u) for u in adapters]
    outs = _stage(summary, executor, "evaluation", run_evaluation_unit, ctx, ev_units,
                  [u.label for u in ev_units], lambda: unit_resources(ctx, "evaluation"), say)

    summary.rows = [r for u, o in zip(ev_units, outs) if o.status != "failed"
                    for r in read_rows(ctx.storage, u.key)]
    seen = set()
    for r in summary.rows:  # adapters trained on something other than their label: say so once each
        if r.get("positives_used") == "real_only_fallback" and r.get("adapter_key") not in seen:
            seen.add(r["adapter_key"])
            summary.fallbacks.append({"instance": r["instance"], "data_config": r["data_config"],
                                      "backbone": r["backbone"], "adapter_key": r["adapter_key"],
                                      "positives_used": "real_only_fallback"})
            say(f"FALLBACK personalization {r['data_config']}:{r['backbone']}:{r['instance']}: trained on "
                "the real photos, not its synthetic positives (synthesis.filter.on_empty=real_only); "
                "its result rows say positives_used=real_only_fallback")


def _write_results(ctx: RunContext, summary: RunSummary, tracker: Any) -> None:
    import pyarrow as pa

    from persrep.evaluation.aggregate import results_frame
    from persrep.generation.shards import table_bytes

    frame = results_frame(summary.rows)
    table = headline_table(frame)
    missing = adapterless_line([b.name for b in ctx.settings.personalization.backbones], table, summary.failures)
    if missing:
        summary.notes.append(missing)
    summary.table = format_summary(table, missing)
    base = f"runs/{ctx.run_id}"
    st = ctx.storage
    st.write_bytes(f"{base}/results.parquet", table_bytes(pa.Table.from_pandas(frame, preserve_index=False)))
    from persrep.redaction import redact_obj, redact_text  # no credentials in a results folder

    st.write_bytes(f"{base}/settings.yaml",
                   yaml.safe_dump(redact_obj(settings_to_dict(ctx.settings)), sort_keys=False).encode())
    st.write_bytes(f"{base}/summary.md", summary.table.encode())
    st.write_bytes(f"{base}/units.json", json.dumps(summary.units, indent=0).encode())
    from persrep.console import failure_file, failure_text

    for unit, trace in summary.traces.items():  # full tracebacks, named by the FAILED lines
        st.write_bytes(f"{base}/{failure_file(unit)}", failure_text(redact_text(trace)).encode())
    doc = {"run_id": ctx.run_id, "config": ctx.settings.name, "data": ctx.data_path,
           "instances": len(ctx.instances), "stages": summary.stages, "failures": summary.failures,
           "retries": summary.retries, "timings": summary.timings, "notes": summary.notes,
           "fallbacks": summary.fallbacks, "synthesis_units": summary.synthesis_units,
           "costs": stage_costs(summary.units, summary.timings),  # seconds + peak RSS per stage, unit type
           "leakage_warning": ctx.settings.personalization.negatives == "in_pool",
           "headline": json.loads(table.to_json(orient="records")) if len(table) else []}
    st.write_bytes(f"{base}/summary.json", json.dumps(doc, indent=1, default=str).encode())
    summary.run_uri = st.uri(base)
    tracker.log_results(frame)
    if summary.synthesis_units:  # the filter's verdicts where people look, before the tables
        fractions = [u["kept_fraction"] for u in summary.synthesis_units if u["kept_fraction"] is not None]
        tracker.log_metrics({"synthesis_kept_fraction_min": min(fractions),
                             "synthesis_kept_fraction_mean": sum(fractions) / len(fractions),
                             "synthesis_units_failed": sum(u["verdict"] == "failed" for u in summary.synthesis_units),
                             "adapters_real_only_fallback": len(summary.fallbacks)})
        tracker.log_text(json.dumps(summary.synthesis_units, indent=1), "synthesis_units.json")
    if not st.is_s3:  # local run dir: render the report beside the results and track both
        from persrep.report import write_report

        try:
            write_report(st.path(base), st.path(base, "report"))
        except Exception as exc:  # noqa: BLE001 - a plotting problem must not lose the results
            summary.notes.append(f"report not written: {exc}")
        tracker.log_run_dir(st.path(base))
