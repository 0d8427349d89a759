"""Skip finished units on the driver: a re-run launches nothing for what is already published.

Every unit function already returns ``skipped`` for a unit published intact, but only once it
runs: with Ray that is a task per unit, and the first task on each worker pays the worker's
start and imports (torch, timm, ...: seconds each). :func:`map_unfinished` asks the storage
first (``is_intact``: the manifest, and each file's size and time, as the unit function would) and
hands the executor only the units still to do; the others get the same ``skipped`` outcome the
unit function would have returned. A stage with nothing left launches no task at all.

Stages covered: those that go through ``executor.map`` and whose unit function's skip result is
exactly ``{"status": "skipped", "key": key}`` (personalisation in-process; the Tune stage already
skips published adapters up front). Synthesis is left out: the Ray Data stage skips published
units up front, and the in-process unit's skip result carries the unit's counts (its verdict).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from persrep.pipeline import auto_masks, captions_stage, shared_images
from persrep.pipeline.executor import Outcome
from persrep.pipeline.work import ADAPTERS, EVALUATIONS, GENERATORS

# stage -> storage area its units publish to (the area each unit function checks)
STAGE_AREAS: dict[str, str] = {"auto_masks": auto_masks.STAGE, "captions": captions_stage.STAGE,
                               "base_images": shared_images.STAGE, "generator_prep": GENERATORS,
                               "personalization": ADAPTERS, "evaluation": EVALUATIONS}


def unit_key(unit: Any) -> str | None:
    return unit.get("key") if isinstance(unit, dict) else getattr(unit, "key", None)


def map_unfinished(ctx: Any, stage: str, units: Sequence[Any], labels: Sequence[str],
                   run: Callable[[list[Any], list[str]], list[Outcome]],
                   say: Callable[[str], None] | None = None) -> list[Outcome]:
    """Outcomes for ``units`` in order: ``skipped`` for the published ones (checked here, one
    progress line each), ``run(todo_units, todo_labels)`` for the rest (not called when nothing
    is left)."""
    area = STAGE_AREAS.get(stage)
    if area is None or not units:
        return run(list(units), list(labels)) if units else []
    outcomes: list[Outcome | None] = [None] * len(units)
    todo: list[int] = []
    for i, unit in enumerate(units):
        key = unit_key(unit)
        if key and ctx.storage.is_intact(area, key):
            outcomes[i] = Outcome(labels[i], "skipped", {"status": "skipped", "key": key}, seconds=0.0)
            if say is not None:
                say(f"{stage}: {i + 1}/{len(units)} {labels[i]} -> skipped")
        else:
            todo.append(i)
    if todo:
        for i, o in zip(todo, run([units[i] for i in todo], [labels[i] for i in todo])):
            outcomes[i] = o
    return outcomes  # type: ignore[return-value]
