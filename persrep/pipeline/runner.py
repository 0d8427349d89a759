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
from persrep.generation.base import generator_class
from persrep.generation.plan import build_rows, data_configs
from persrep.pipeline.captions_stage import llm_captions, plan_caption_units, run_caption_unit
from persrep.pipeline.context import RunContext, prepare_run
from persrep.keys import result_settings
from persrep.pipeline.executor import Executor, LocalExecutor, Outcome, Resources
from persrep.pipeline.memory import count_units, plan_stages
from persrep.generation import shards
from persrep.pipeline.summary import format_summary, headline_table
from persrep.pipeline.unit_stats import stage_costs, unit_record
from persrep.pipeline.verdict import synthesis_verdict
from persrep.pipeline.work import (PersonalizeUnit, SynthesisUnit, generator_key, personalize_key,
                                   read_rows, run_evaluation_unit, run_generator_unit,
                                   run_personalize_unit, run_synthesis_unit, synthesis_key)

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


def _special_stage(summary: RunSummary, name: str, how: str, n_units: int, say: Progress,
                   run: Callable[[], list[Outcome]]) -> list[Outcome]:
    """Time a stage, record its outcomes in the summary, and say how it went."""
    t0 = time.perf_counter()
    say(f"stage {name}: {n_units} units{f' ({how})' if how else ''}")
    outs = run()
    summary.record(name, outs, time.perf_counter() - t0)
    c = summary.stages[name]
    say(f"stage {name}: {c['done']} done, {c['skipped']} skipped (finished earlier), "
        f"{c['failed']} failed in {summary.timings[name]:.1f} s")
    if callable(getattr(say, "stage_outcomes", None)):  # persrep.console: per-instance table
        say.stage_outcomes(name, outs)
    return outs


def _stage(summary: RunSummary, executor: Executor, name: str, fn, ctx, units, labels,
           resources: Resources, say: Progress) -> list[Outcome]:
    """A stage whose units the executor maps over (in-process loop or Ray tasks); units already
    published are skipped here, without a task (pipeline/finished.py); each unit's seconds and
    peak memory are measured where it runs (pipeline/unit_stats.py)."""
    from persrep.pipeline.finished import map_unfinished
    from persrep.pipeline.unit_stats import Measured

    return _special_stage(summary, name, "", len(units), say, lambda: map_unfinished(
        ctx, name, units, labels, lambda us, ls: executor.map(Measured(fn), ctx, us, ls, resources, name), say))


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
    summary.timings["total"] = round(time.perf_counter() - t_start, 2)
    _write_results(ctx, summary, tracker)
    tracker.end("FINISHED" if not summary.failures else "FAILED")
    for r in summary.retries:
        say(f"RETRIED {r['stage']} {r['unit']}: {r['attempts']} attempts, {r['status']}")
    for f in summary.failures:
        say(f"FAILED {f['stage']} {f['unit']} after {f['attempts']} attempt(s): {f['error']}")
    return summary


def unit_resources(ctx: RunContext, stage: str) -> Resources:
    """What one unit of ``stage`` reserves: CPUs / GPUs from settings, memory from the plan."""
    res = ctx.settings.resources
    return Resources(cpus=res.cpus_per_trial, gpus=res.gpus_per_trial, memory=ctx.memory.get(stage, 0))


def plan_resources(ctx: RunContext, executor: Executor, say: Progress) -> None:
    """Before compute: estimate each heavy unit's memory (persrep.pipeline.memory), check that it
    fits on some node (else one line, exit 2), print the plan, and record the reservations in
    ``ctx.memory`` for every stage to request."""
    res = ctx.settings.resources
    nodes = executor.node_shapes()
    has_gpus = any(n.gpus > 0 for n in nodes)
    on_gpu = has_gpus and res.gpus_per_trial > 0
    heavy = (res.cpus_per_trial, res.gpus_per_trial if on_gpu else 0.0)
    requests = {"generator_prep": heavy, "personalization": heavy, "evaluation": heavy,
                "synthesis": (res.cpus_per_actor, 1.0 if has_gpus else 0.0)}
    counts = count_units(ctx.settings, len(ctx.instances), len(set(ctx.instances.values())))
    plans = plan_stages(ctx.settings, counts, nodes, requests, on_gpu)
    sequential = getattr(executor, "sequential", False)
    for p in plans:
        say(p.line() if not sequential else p.line().rsplit(";", 1)[0] + "; one at a time (in this process)")
    ctx.memory = {p.stage: p.estimate.bytes for p in plans}


@dataclass
class DataStages:
    """What stages 1-2 made available: trained generators and synthesis units, by key."""
    ready: dict[tuple[str, str], str] = field(default_factory=dict)  # (generator, instance) -> key
    synthesized: dict[str, str] = field(default_factory=dict)        # row group -> synthesis key


def plan_generator_units(ctx: RunContext) -> list[dict[str, Any]]:
    """Stage 1's units: one per (trained generator type, instance)."""
    from persrep.pipeline.shared_images import class_images_unit

    trained = [t for t in ctx.settings.generator.types if generator_class(t).needs_training]
    units = [{"generator": t, "instance": n, "key": generator_key(ctx, t, n)}
             for t in trained for n in sorted(ctx.instances)]
    for u in units:  # DreamBooth reads its category's class images from their shared unit
        shared = class_images_unit(ctx.settings, ctx.instances[u["instance"]])
        if shared is not None and u["generator"] in ("dreambooth", "masked_dreambooth"):
            u["class_images"] = shared.key
    return units


def plan_synthesis_units(ctx: RunContext, ready: dict[tuple[str, str], str]) -> list[SynthesisUnit]:
    """Stage 2's units: one per group of rows (a generator loaded once per group); groups whose
    trained generator is not in ``ready`` are left out (their generator failed)."""
    settings = ctx.settings
    configs = {c.key: c for c in data_configs(settings)}
    syn_units: list[SynthesisUnit] = []
    for group, rows in build_rows(settings, ctx.instances, llm_captions(ctx)).items():
        kind = group.split(":")[0]
        if kind == "neg":
            if settings.personalization.negatives != "generated":
                continue
            unit = SynthesisUnit(group, "base", rows[0].instance, rows, None)
        else:
            cfg = configs[group.split(":")[1]]
            name = group.split(":", 2)[2]
            if cfg.generator == "real_only":
                continue  # real-only positives are the real photos themselves, augmented in training
            gkey = ready.get((cfg.generator, name)) if generator_class(cfg.generator).needs_training else None
            if generator_class(cfg.generator).needs_training and gkey is None:
                continue  # its generator failed: recorded in generator_prep
            unit = SynthesisUnit(group, cfg.generator, name, rows, gkey)
        sampler: dict[str, Any] = {}
        if unit.generator == "cut_paste":
            from persrep.pipeline.shared_images import backgrounds_unit

            cut_paste = settings.synthesis.cut_paste.model_dump(mode="json")
            cut_paste.pop("num_backgrounds")  # counted in the backgrounds unit's key, if generated
            sampler = {"cut_paste": cut_paste}
            shared = backgrounds_unit(settings, ctx.instances[unit.instance])
            if shared is not None:  # generated backgrounds: their unit's key is an input
                sampler["backgrounds_key"] = shared.key
        unit.key = synthesis_key(ctx, group, rows, unit.generator_key, sampler)
        syn_units.append(unit)
    return syn_units


def plan_personalize_units(ctx: RunContext, synthesized: dict[str, str]) -> list[PersonalizeUnit]:
    """Stage 3's units: one per (data configuration, instance, backbone) whose data exists."""
    settings = ctx.settings
    pz_units: list[PersonalizeUnit] = []
    for cfg in data_configs(settings):
        for name in sorted(ctx.instances):
            cat = ctx.instances[name]
            pos_key, fallback = None, False
            if cfg.generator != "real_only":
                pos_key = synthesized.get(f"pos:{cfg.key}:{name}")
                if pos_key is None:
                    continue
                verdict = synthesis_verdict(ctx.storage.manifest(shards.STAGE, pos_key).meta, settings)
                if verdict.status == "failed":
                    continue  # reported by the synthesis stage (or the sweep's data phase)
                fallback = verdict.status == "fallback"
            neg_keys = [k for g, k in synthesized.items() if g.startswith("neg:") and g.endswith(f":{cat}")]
            if settings.personalization.negatives == "generated" and not neg_keys:
                continue
            for bs in settings.personalization.backbones:
                u = PersonalizeUnit(name, cat, cfg, bs, pos_key, sorted(neg_keys), positives_fallback=fallback)
                u.key = personalize_key(ctx, u)
                pz_units.append(u)
    return pz_units


def adapter_eval_unit(ctx: RunContext, u: PersonalizeUnit) -> dict[str, Any]:
    """Stage 4's unit for one adapter (its instance, keyed by adapter + evaluation settings)."""
    return {"kind": "adapter", "backbone": u.backbone, "instance": u.instance,
            "adapter_key": u.key, "key": content_key("eval-adapter", u.key, result_settings(ctx.settings.evaluation, "evaluation"),
                               ctx.dataset_key),
            "keys": {"backbone": u.backbone.name, "data_config": u.config.label,
                     "generator": u.config.generator,
                     "cfg": u.config.cfg if u.config.cfg is not None else float("nan"),
                     "caption_source": u.config.caption_source, "adapter_key": u.key,
                     "negatives_source": ctx.settings.personalization.negatives}}


def run_data_stages(ctx: RunContext, executor: Executor, summary: RunSummary, say: Progress,
                    skip_keys: set[str] | None = None) -> DataStages:
    """Stages 1-2 (generator prep, synthesis). Units whose key is in ``skip_keys`` are not run
    (a caller that already ran them, e.g. a sweep over several data settings, counts them as
    available); the keys of the units run here are added to it."""
    skip = skip_keys if skip_keys is not None else set()
    out = DataStages()

    # 0. auto masks (generator.auto_masks): one unit per instance without train masks
    from persrep.pipeline.auto_masks import low_confidence_notes, plan_mask_units, run_mask_unit

    mask_units = [u for u in plan_mask_units(ctx) if u["key"] not in skip]
    if mask_units:
        skip.update(u["key"] for u in mask_units)
        _stage(summary, executor, "auto_masks", run_mask_unit, ctx, mask_units,
               [f"masks:{u['instance']}" for u in mask_units], unit_resources(ctx, "auto_masks"), say)
        summary.notes += low_confidence_notes(ctx, mask_units)

    # 0. LLM captions: one unit per category, before the synthesis rows are planned (captions_stage.py)
    cap_units = [u for u in plan_caption_units(ctx) if u["key"] not in skip]
    skip.update(u["key"] for u in cap_units)
    if cap_units:
        _stage(summary, executor, "captions", run_caption_unit, ctx, cap_units,
               [f"captions:{u['category']}" for u in cap_units], unit_resources(ctx, "captions"), say)

    # 0. base images shared per category (class images, generated backgrounds): drawn once
    from persrep.pipeline.shared_images import plan_shared_units, run_shared_unit

    shared = [u for u in plan_shared_units(ctx.settings, ctx.instances) if u.key not in skip]
    skip.update(u.key for u in shared)
    if shared:
        outs = _stage(summary, executor, "base_images", run_shared_unit, ctx, shared,
                      [f"{u.kind}:{u.category}" for u in shared], unit_resources(ctx, "synthesis"), say)
        failed = {u.key for u, o in zip(shared, outs) if o.status == "failed"}
    else:
        failed = set()

    # 1. generator prep: one unit per (instance, trained generator type)
    planned = [u for u in plan_generator_units(ctx) if u.get("class_images") not in failed]
    out.ready = {(u["generator"], u["instance"]): u["key"] for u in planned if u["key"] in skip}
    gen_units = [u for u in planned if u["key"] not in skip]
    skip.update(u["key"] for u in gen_units)
    outs = _stage(summary, executor, "generator_prep", run_generator_unit, ctx, gen_units,
                  [f"{u['generator']}:{u['instance']}" for u in gen_units], unit_resources(ctx, "generator_prep"), say)
    out.ready.update({(u["generator"], u["instance"]): u["key"] for u, o in zip(gen_units, outs)
                      if o.status != "failed"})
    for u, o in zip(gen_units, outs):  # the per-instance status table of generator prep
        say(f"  {u['instance']:24s} {u['generator']:18s} {o.status:8s} {o.error or ''}")

    # 2. synthesis: one unit per group of rows (a generator loaded once per group)
    planned_syn = plan_synthesis_units(ctx, out.ready)
    out.synthesized = {u.group: u.key for u in planned_syn if u.key in skip}
    syn_units = [u for u in planned_syn if u.key not in skip]
    skip.update(u.key for u in syn_units)
    synthesis_stage = getattr(executor, "synthesis_stage", None)  # Ray: a Ray Data actor pool
    if synthesis_stage is not None and syn_units:
        outs = _special_stage(summary, "synthesis", "Ray Data", len(syn_units), say,
                              lambda: synthesis_stage(ctx, syn_units, say))
        st = getattr(outs, "stats", None)
        if st:
            summary.notes.append(f"synthesis: {st['rows']} rows, {st['errors']} row errors, "
                                 f"{st['loads']} generator loads on {st['actors']} actor(s)")
    else:
        outs = _stage(summary, executor, "synthesis", run_synthesis_unit, ctx, syn_units,
                      [u.group for u in syn_units], unit_resources(ctx, "synthesis"), say)
    out.synthesized.update({u.group: u.key for u, o in zip(syn_units, outs) if o.status != "failed"})
    summary.record_synthesis(syn_units, outs, say)
    return out


def _run_stages(ctx: RunContext, executor: Executor, summary: RunSummary, tracker: Any,
                say: Progress) -> None:
    settings = ctx.settings
    instances = sorted(ctx.instances)

    # 1-2. generator prep and synthesis
    synthesized = run_data_stages(ctx, executor, summary, say).synthesized

    # 3. personalisation: one unit per (instance, data configuration, backbone)
    pz_units = plan_personalize_units(ctx, synthesized)

    pz_labels = [f"{u.config.label}:{u.backbone.name}:{u.instance}" for u in pz_units]
    stage3 = getattr(executor, "run_personalization", None)  # RayExecutor: one Tune trial per unit
    if stage3 is not None and pz_units:
        outs = _special_stage(summary, "personalization", "Ray Tune", len(pz_units), say,
                              lambda: stage3(ctx, pz_units, pz_labels, tracker))
    else:
        outs = _stage(summary, executor, "personalization", run_personalize_unit, ctx, pz_units,
                      pz_labels, unit_resources(ctx, "personalization"), say)
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
    ev = settings.evaluation
    ev_units = []
    common = {"negatives_source": settings.personalization.negatives}
    if ev.evaluate_pretrained:
        for bs in settings.personalization.backbones:
            ev_units.append({"kind": "pretrained", "backbone": bs, "key": content_key(
                "eval-pretrained", bs, result_settings(ev, "evaluation"), ctx.dataset_key, instances),
                "keys": {"backbone": bs.name, "data_config": "-", "generator": "-", "cfg": float("nan"),
                         "caption_source": "-", "adapter_key": "-", "positives_used": "-",
                         "n_positives": -1, **common}})
    ev_units += [adapter_eval_unit(ctx, u) for u in adapters]
    outs = _stage(summary, executor, "evaluation", run_evaluation_unit, ctx, ev_units,
                  [f"{u['kind']}:{u['backbone'].name}:{u.get('instance', 'all')}" for u in ev_units],
                  unit_resources(ctx, "evaluation"), say)

    summary.rows = [r for u, o in zip(ev_units, outs) if o.status != "failed"
                    for r in read_rows(ctx.storage, u["key"])]
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
    summary.table = format_summary(table)
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
