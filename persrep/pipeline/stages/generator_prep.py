"""Generator prep (stage 4 of 7): one personalised generator per (type that trains per instance,
instance), trained and published under ``<root>/generators/<key>/`` (its files + a record). A
unit whose shared class images failed is not planned; a failed unit drops its synthesis units."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from persrep.generation.base import GeneratorArtifact, generator_caps, generator_class, generator_for, get_generator
from persrep.pipeline.context import RunContext
from persrep.pipeline.executor import Outcome
from persrep.pipeline.instance_data import instance_data, scratch_dir
from persrep.pipeline.planned import PlannedStage, StageScope
from persrep.pipeline.shared_images import CLASS_IMAGES, class_images_unit
from persrep.pipeline.units import GENERATOR_AREA, Unit
from persrep.storage import Storage


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


def plan_generator_units(ctx: RunContext) -> list[GeneratorUnit]:
    """Generator prep's units: one per (type that trains per instance, instance)."""
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


def run_generator_unit(ctx: RunContext, unit: GeneratorUnit) -> dict[str, Any]:
    """Train a personalised generator for one instance; publish its weights."""
    gtype, name, key = unit.generator, unit.instance, unit.key
    if ctx.storage.is_intact(GENERATOR_AREA, key):
        return {"status": "skipped", "key": key}
    t0, started_at = time.perf_counter(), time.time()
    # the type's factory reads what it shares per category (DreamBooth: its class images)
    gen = generator_for(ctx, gtype, ctx.instances[name], "generator_prep")
    artifact = gen.prepare(instance_data(ctx, name), scratch_dir(ctx, "class_images"))
    if artifact.key != key:
        raise RuntimeError(f"{gtype} {name}: artifact key {artifact.key} != planned {key}")
    meta = {"generator": gtype, "instance": name, "settings": artifact.settings.get("settings", {}),
            "seconds": time.perf_counter() - t0, "started_at": started_at, "finished_at": time.time()}
    ctx.storage.publish(GENERATOR_AREA, key, artifact.files, meta)
    return {"status": "done", "key": key, "seconds": meta["seconds"]}


def load_artifact(storage: Storage, gtype: str, name: str, key: str) -> GeneratorArtifact:
    """A published generator's files and record (what a synthesis unit loads)."""
    man = storage.verify_unit(GENERATOR_AREA, key)
    files = {f: storage.read_unit_file(GENERATOR_AREA, key, f, man) for f in man.files}
    return GeneratorArtifact(gtype, name, files, man.meta, key)


def planned(scope: StageScope) -> PlannedStage:
    """Generator prep: its units minus those whose class images failed; records in
    ``scope.ready`` the generators that exist (made now or earlier) for synthesis's planner."""
    def plan() -> list[GeneratorUnit]:  # a unit whose class images failed cannot run
        return [u for u in plan_generator_units(scope.ctx) if not set(u.shared_inputs) & scope.failed("base_images")]

    def report(units: list[GeneratorUnit], outs: list[Outcome]) -> None:
        scope.ready.update({(u.generator, u.instance): u.key for u, o in zip(units, outs) if o.status != "failed"})
        for u, o in zip(units, outs):  # the per-instance status table of generator prep
            scope.progress(f"  {u.instance:24s} {u.generator:18s} {o.status:8s} {o.error or ''}")

    return PlannedStage("generator_prep", plan, run_generator_unit, lambda u: u.label, report=report,
                        always=True,
                        available=lambda done: scope.ready.update({(u.generator, u.instance): u.key for u in done}))
