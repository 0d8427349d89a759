"""A sweep's synthetic data: the distinct data configurations of a space, generated once.

Every combination of the data keys' values gives settings whose generator prep and synthesis
units are planned exactly as the pipeline plans them (``persrep.pipeline.stages``). Two
combinations that plan the same units and the same data configuration (e.g. ``real_only`` with
CFG 4 and with CFG 5: real-only ignores CFG) are one :class:`DataOption`: their trials would train
identical adapters, so the sweep offers Tune each distinct option once. Before the trials,
:func:`generate_data` runs generator prep + synthesis for the union of every option's units,
each unit once (by key); units already published (an earlier sweep, a ``run_all`` with the same
settings) are skipped. Trials then only read them. No Ray here: the stages run on the executor
given (``RayExecutor`` in ``ray_jobs/sweep.py``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from persrep.config import content_key
from persrep.generation import shards
from persrep.generation.plan import data_configs
from persrep.pipeline.context import RunContext, preflight_models
from persrep.pipeline.executor import Executor
from persrep.pipeline.resource_plan import ResourcePlan
from persrep.pipeline.results import RunSummary
from persrep.pipeline.sequence import run_data_stages
from persrep.pipeline.stages.captions import ensure_captions
from persrep.pipeline.stages.generator_prep import plan_generator_units
from persrep.pipeline.stages.synthesis import plan_synthesis_units
from persrep.pipeline.units import GENERATOR_AREA
from persrep.sweep.space import SweepSpace

Progress = Callable[[str], None]
ANY = "*"  # a data key whose value does not matter for an option (several values collapse)


@dataclass
class DataOption:
    """One distinct data configuration of the space (what a trial's ``data`` value names)."""

    label: str
    key: str
    values: dict[str, Any]                  # the data keys' values of its first combination
    members: list[dict[str, Any]]           # every combination that gives this data
    config_label: str                       # the pipeline's data configuration label
    generator_keys: list[str] = field(default_factory=list)
    synthesis_keys: dict[str, str] = field(default_factory=dict)  # row group -> synthesis key

    def column(self, key: str) -> Any:
        """The data key's value for this option, or ``*`` when its members differ there."""
        vals = {json.dumps(m.get(key), sort_keys=True, default=str) for m in self.members}
        return self.values.get(key) if len(vals) == 1 else ANY

    @property
    def unit_keys(self) -> set[str]:
        return set(self.generator_keys) | set(self.synthesis_keys.values())


@dataclass
class DataReport:
    """What the data phase did: distinct units planned, already published, made now, failed."""

    options: int = 0
    combinations: int = 0
    planned: dict[str, int] = field(default_factory=lambda: {"generator_prep": 0, "synthesis": 0})
    already: dict[str, int] = field(default_factory=lambda: {"generator_prep": 0, "synthesis": 0})
    stages: dict[str, dict[str, int]] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def line(self) -> str:
        made = {s: c.get("done", 0) for s, c in self.stages.items()}
        return (f"data: {self.combinations} combinations of data keys -> {self.options} distinct data "
                f"configurations; units planned: {self.planned['generator_prep']} generators, "
                f"{self.planned['synthesis']} synthesis; already published: "
                f"{self.already['generator_prep']} + {self.already['synthesis']}; generated now: "
                f"{made.get('generator_prep', 0)} + {made.get('synthesis', 0)}; failed: {len(self.failures)}")


def option_context(ctx: RunContext, space: SweepSpace, values: dict[str, Any]) -> RunContext:
    """The run context with the settings of one point of the space (data and/or trial keys)."""
    return replace(ctx, settings=space.settings_for(values))


def resolve_data(space: SweepSpace, ctx: RunContext) -> list[DataOption]:
    """Plan every data combination's units; group the combinations into distinct options.

    Also locates each option's models (``preflight_models``), so a missing diffusion model for
    one generator type fails here, before any compute. Raises ``PlanError`` (e.g. a captions
    file without an entry) with one line.
    """
    options: dict[str, DataOption] = {}
    preflighted: set[str] = set()
    for combo in space.data_combinations():
        c = option_context(ctx, space, combo)
        s = c.settings
        pre = content_key(s.generator.types, s.generator.base_model, s.personalization.backbones,
                          s.personalization.negatives, s.generator.cut_paste.backgrounds)
        if pre not in preflighted:
            preflight_models(s)
            preflighted.add(pre)
        ensure_captions(c)  # synthesis keys depend on the captions' text: generate them first
        gen = plan_generator_units(c)
        ready = {(u.generator, u.instance): u.key for u in gen}
        syn = plan_synthesis_units(c, ready)
        (config,) = data_configs(s)  # validated: one per trial
        pz = s.personalization.model_dump(mode="json")
        pz.pop("backbones")
        key = content_key("sweep-data", config.key, sorted((u.group, u.key) for u in syn), pz)
        if key in options:
            options[key].members.append(combo)
            continue
        options[key] = DataOption(config.label, key, dict(combo), [combo], config.label,
                                  sorted({u.key for u in gen}), {u.group: u.key for u in syn})
    out = list(options.values())
    _unique_labels(out, space.data_keys)
    return out


def _unique_labels(options: list[DataOption], data_keys: list[str]) -> None:
    """Label = the data configuration's label, plus the data keys that tell same-label options apart."""
    by_label: dict[str, list[DataOption]] = {}
    for o in options:
        by_label.setdefault(o.config_label, []).append(o)
    for label, group in by_label.items():
        if len(group) == 1:
            continue
        differing = [k for k in data_keys if len({json.dumps(o.column(k), default=str) for o in group}) > 1]
        for i, o in enumerate(group):
            extra = ",".join(f"{k.rsplit('.', 1)[-1]}={o.column(k)}" for k in differing) or f"#{i + 1}"
            o.label = f"{label}[{extra}]"
    seen: dict[str, int] = {}
    for o in options:  # still equal (e.g. differing only in list-valued keys): number them
        seen[o.label] = seen.get(o.label, 0) + 1
        if seen[o.label] > 1:
            o.label = f"{o.label}#{seen[o.label]}"


def generate_data(ctx: RunContext, space: SweepSpace, options: list[DataOption], executor: Executor,
                  say: Progress, plan: ResourcePlan | None = None) -> DataReport:
    """Generator prep + synthesis for every option's units, each distinct unit once (``plan``: what
    each unit reserves)."""
    import time

    t0 = time.perf_counter()
    report = DataReport(options=len(options), combinations=sum(len(o.members) for o in options))
    gen_keys = sorted({k for o in options for k in o.generator_keys})
    syn_keys = sorted({k for o in options for k in o.synthesis_keys.values()})
    report.planned = {"generator_prep": len(gen_keys), "synthesis": len(syn_keys)}
    # what a re-run may skip: published and (where the storage checks it) matching its checksums
    published = ctx.storage.is_intact
    done_gen = {k for k in gen_keys if published(GENERATOR_AREA, k)}
    done_syn = {k for k in syn_keys if published(shards.STAGE, k)}
    report.already = {"generator_prep": len(done_gen), "synthesis": len(done_syn)}
    handled: set[str] = done_gen | done_syn  # run_data_stages adds what it runs
    for o in options:
        if o.unit_keys <= handled:
            continue
        say(f"data: generating {o.label} ({len(o.unit_keys - handled)} units)")
        summary = RunSummary(ctx.run_id)
        stages = run_data_stages(option_context(ctx, space, o.values), executor, summary, say, handled, plan)
        o.synthesis_keys = dict(stages.synthesized)
        for stage, counts in summary.stages.items():
            tot = report.stages.setdefault(stage, {})
            for k, v in counts.items():
                tot[k] = tot.get(k, 0) + v
        report.failures += [{**f, "data": o.label} for f in summary.failures]
    report.seconds = round(time.perf_counter() - t0, 2)
    return report
