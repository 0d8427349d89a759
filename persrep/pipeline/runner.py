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
from persrep.pipeline.context import RunContext, prepare_run
from persrep.pipeline.executor import Executor, LocalExecutor, Outcome, Resources
from persrep.pipeline.summary import format_summary, headline_table
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

    def record(self, stage: str, outcomes: list[Outcome], seconds: float) -> None:
        counts = {"done": 0, "skipped": 0, "failed": 0, "retried": 0}
        for o in outcomes:
            counts[o.status] = counts.get(o.status, 0) + 1
            counts["retried"] += o.attempts > 1
            if o.attempts > 1:
                self.retries.append({"stage": stage, "unit": o.label, "attempts": o.attempts, "status": o.status})
            if o.status == "failed":
                self.failures.append({"stage": stage, "unit": o.label, "error": o.error, "attempts": o.attempts})
        self.stages[stage] = counts
        self.timings[stage] = round(seconds, 2)

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
    return outs


def _stage(summary: RunSummary, executor: Executor, name: str, fn, ctx, units, labels,
           resources: Resources, say: Progress) -> list[Outcome]:
    """A stage whose units the executor maps over (in-process loop or Ray tasks)."""
    return _special_stage(summary, name, "", len(units), say,
                          lambda: executor.map(fn, ctx, units, labels, resources, name) if units else [])


def run_pipeline(settings: Settings, progress: Progress | None = None,
                 executor: Executor | None = None, run_id: str | None = None) -> RunSummary:
    from persrep.tracking import Tracker

    say = progress or (lambda _m: None)
    t_start = time.perf_counter()
    tracker = Tracker.from_settings(settings, say=say).connect()  # required + down: fails here
    ctx = prepare_run(settings, say, run_id)
    for note in ctx.notes:
        say(note)
    executor = executor or LocalExecutor(settings.resources.max_retries, say)
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


@dataclass
class DataStages:
    """What stages 1-2 made available: trained generators and synthesis units, by key."""
    ready: dict[tuple[str, str], str] = field(default_factory=dict)  # (generator, instance) -> key
    synthesized: dict[str, str] = field(default_factory=dict)        # row group -> synthesis key


def plan_generator_units(ctx: RunContext) -> list[dict[str, Any]]:
    """Stage 1's units: one per (trained generator type, instance)."""
    trained = [t for t in ctx.settings.generator.types if generator_class(t).needs_training]
    return [{"generator": t, "instance": n, "key": generator_key(ctx, t, n)}
            for t in trained for n in sorted(ctx.instances)]


def plan_synthesis_units(ctx: RunContext, ready: dict[tuple[str, str], str]) -> list[SynthesisUnit]:
    """Stage 2's units: one per group of rows (a generator loaded once per group); groups whose
    trained generator is not in ``ready`` are left out (their generator failed)."""
    settings = ctx.settings
    configs = {c.key: c for c in data_configs(settings)}
    syn_units: list[SynthesisUnit] = []
    for group, rows in build_rows(settings, ctx.instances).items():
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
        unit.key = synthesis_key(ctx, group, rows, unit.generator_key,
                                 {"cut_paste": settings.synthesis.cut_paste} if unit.generator == "cut_paste" else {})
        syn_units.append(unit)
    return syn_units


def plan_personalize_units(ctx: RunContext, synthesized: dict[str, str]) -> list[PersonalizeUnit]:
    """Stage 3's units: one per (data configuration, instance, backbone) whose data exists."""
    settings = ctx.settings
    pz_units: list[PersonalizeUnit] = []
    for cfg in data_configs(settings):
        for name in sorted(ctx.instances):
            cat = ctx.instances[name]
            pos_key = None
            if cfg.generator != "real_only":
                pos_key = synthesized.get(f"pos:{cfg.key}:{name}")
                if pos_key is None:
                    continue
            neg_keys = [k for g, k in synthesized.items() if g.startswith("neg:") and g.endswith(f":{cat}")]
            if settings.personalization.negatives == "generated" and not neg_keys:
                continue
            for bs in settings.personalization.backbones:
                u = PersonalizeUnit(name, cat, cfg, bs, pos_key, sorted(neg_keys))
                u.key = personalize_key(ctx, u)
                pz_units.append(u)
    return pz_units


def adapter_eval_unit(ctx: RunContext, u: PersonalizeUnit) -> dict[str, Any]:
    """Stage 4's unit for one adapter (its instance, keyed by adapter + evaluation settings)."""
    return {"kind": "adapter", "backbone": u.backbone, "instance": u.instance,
            "adapter_key": u.key, "key": content_key("eval-adapter", u.key, ctx.settings.evaluation, ctx.dataset_key),
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
    res = ctx.settings.resources
    heavy = Resources(cpus=res.cpus_per_trial, gpus=res.gpus_per_trial)
    skip = skip_keys if skip_keys is not None else set()
    out = DataStages()

    # 0. auto masks (generator.auto_masks): one unit per instance without train masks
    from persrep.pipeline.auto_masks import low_confidence_notes, plan_mask_units, run_mask_unit

    mask_units = [u for u in plan_mask_units(ctx) if u["key"] not in skip]
    if mask_units:
        skip.update(u["key"] for u in mask_units)
        _stage(summary, executor, "auto_masks", run_mask_unit, ctx, mask_units,
               [f"masks:{u['instance']}" for u in mask_units], Resources(cpus=res.cpus_per_trial), say)
        summary.notes += low_confidence_notes(ctx, mask_units)

    # 1. generator prep: one unit per (instance, trained generator type)
    planned = plan_generator_units(ctx)
    out.ready = {(u["generator"], u["instance"]): u["key"] for u in planned if u["key"] in skip}
    gen_units = [u for u in planned if u["key"] not in skip]
    skip.update(u["key"] for u in gen_units)
    outs = _stage(summary, executor, "generator_prep", run_generator_unit, ctx, gen_units,
                  [f"{u['generator']}:{u['instance']}" for u in gen_units], heavy, say)
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
                      [u.group for u in syn_units], heavy, say)
    out.synthesized.update({u.group: u.key for u, o in zip(syn_units, outs) if o.status != "failed"})
    for u, o in zip(syn_units, outs):  # rows that raised: kept in the shards with their error
        if o.value.get("errors"):
            summary.failures.append({"stage": "synthesis", "unit": u.group, "attempts": o.attempts,
                                     "error": f"{o.value['errors']} of {o.value.get('rows', '?')} rows "
                                              "failed to generate (their error is in the shard rows)"})
    return out


def _run_stages(ctx: RunContext, executor: Executor, summary: RunSummary, tracker: Any,
                say: Progress) -> None:
    settings = ctx.settings
    res = settings.resources
    heavy = Resources(cpus=res.cpus_per_trial, gpus=res.gpus_per_trial)
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
                      pz_labels, heavy, say)
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
                "eval-pretrained", bs, ev, ctx.dataset_key, instances),
                "keys": {"backbone": bs.name, "data_config": "-", "generator": "-", "cfg": float("nan"),
                         "caption_source": "-", "adapter_key": "-", **common}})
    ev_units += [adapter_eval_unit(ctx, u) for u in adapters]
    outs = _stage(summary, executor, "evaluation", run_evaluation_unit, ctx, ev_units,
                  [f"{u['kind']}:{u['backbone'].name}:{u.get('instance', 'all')}" for u in ev_units],
                  Resources(cpus=res.cpus_per_trial, gpus=res.gpus_per_trial), say)

    summary.rows = [r for u, o in zip(ev_units, outs) if o.status != "failed"
                    for r in read_rows(ctx.storage, u["key"])]


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
    from persrep.redaction import redact_obj  # no credentials in a results folder

    st.write_bytes(f"{base}/settings.yaml",
                   yaml.safe_dump(redact_obj(settings_to_dict(ctx.settings)), sort_keys=False).encode())
    st.write_bytes(f"{base}/summary.md", summary.table.encode())
    doc = {"run_id": ctx.run_id, "config": ctx.settings.name, "data": ctx.data_path,
           "instances": len(ctx.instances), "stages": summary.stages, "failures": summary.failures,
           "retries": summary.retries, "timings": summary.timings, "notes": summary.notes,
           "leakage_warning": ctx.settings.personalization.negatives == "in_pool",
           "headline": json.loads(table.to_json(orient="records")) if len(table) else []}
    st.write_bytes(f"{base}/summary.json", json.dumps(doc, indent=1, default=str).encode())
    summary.run_uri = st.uri(base)
    tracker.log_results(frame)
    if not st.is_s3:  # local run dir: render the report beside the results and track both
        from persrep.report import write_report

        try:
            write_report(st.path(base), st.path(base, "report"))
        except Exception as exc:  # noqa: BLE001 - a plotting problem must not lose the results
            summary.notes.append(f"report not written: {exc}")
        tracker.log_run_dir(st.path(base))
