"""The stage list, in order, and one pass over it.

``DATA_STAGES`` (auto masks, captions, base images, generator prep, synthesis) make the data;
``STAGES`` adds personalisation and evaluation. Each stage plans from what the earlier ones made
(:class:`persrep.pipeline.planned.StageScope`): failed class images drop their DreamBooth units,
failed generators their synthesis units, failed synthesis units their adapters. The runner runs
``STAGES``; a sweep runs ``DATA_STAGES`` (:func:`run_data_stages`) for each data option, then its
trials plan personalisation and evaluation units from the same stage modules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from persrep.pipeline.executor import Executor
from persrep.pipeline.planned import PlannedStage, StageScope, run_planned
from persrep.pipeline.progress import Progress, as_progress
from persrep.pipeline.resource_plan import LazyPlan, ResourcePlan
from persrep.pipeline.stages import (auto_masks, base_images, captions, evaluation, generator_prep,
                                     personalization, synthesis)

StageFactory = Callable[[StageScope], PlannedStage]

DATA_STAGES: tuple[StageFactory, ...] = (auto_masks.planned, captions.planned, base_images.planned,
                                         generator_prep.planned, synthesis.planned)
STAGES: tuple[StageFactory, ...] = DATA_STAGES + (personalization.planned, evaluation.planned)


def run_stages(stages: tuple[StageFactory, ...], scope: StageScope, executor: Executor,
               skip_keys: set[str] | None = None) -> StageScope:
    """Run ``stages`` in order. Units whose key is in ``skip_keys`` are not run (a caller that
    already ran them, e.g. a sweep over several data settings, counts them as available); the
    keys of the units run here are added to it."""
    skip = skip_keys if skip_keys is not None else set()
    for make in stages:
        run_planned(make(scope), scope, executor, skip)
    return scope


def run_data_stages(ctx: Any, executor: Executor, summary: Any, progress: Progress | Callable[[str], None],
                    skip_keys: set[str] | None = None, plan: ResourcePlan | None = None) -> StageScope:
    """The stages before personalisation; returns the scope (``ready``: trained generators,
    ``synthesized``: synthesis units, by key). ``plan``: the reservations (default: CPUs and GPUs
    from settings, no memory)."""
    resources = LazyPlan.ready(plan or ResourcePlan.unplanned(ctx.settings))
    scope = StageScope(ctx, summary, as_progress(progress), resources)
    return run_stages(DATA_STAGES, scope, executor, skip_keys)
