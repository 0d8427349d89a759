"""The run's resource plan: what one unit of each stage reserves, made once before compute.

CPUs and GPUs come from ``resources.*``; memory from the per-stage estimates of
:mod:`persrep.pipeline.memory`, checked against the executor's nodes. The plan is its own object,
handed to the executor with each stage (``StageJob.plan``); the run context is never changed.
A lazy executor (a Ray cluster not started yet) gets the plan only when some unit is left to
compute: :class:`LazyPlan` makes it on first use.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from persrep.pipeline.memory import NodeShape, count_units, plan_stages, stage_requests


@dataclass
class Resources:
    """What one unit reserves where it runs."""

    cpus: float = 1.0
    gpus: float = 0.0
    memory: float = 0.0  # bytes of host memory the unit reserves (Ray's `memory` resource); 0 = none


class Nodes(Protocol):
    """What the plan asks of an executor (``persrep.pipeline.executor.Executor`` declares both)."""

    sequential: bool

    def node_shapes(self) -> list[NodeShape]: ...


@dataclass(frozen=True)
class ResourcePlan:
    """Per-unit reservations: ``cpus`` / ``gpus`` for every stage, ``memory`` bytes per stage."""

    cpus: float = 1.0
    gpus: float = 0.0
    memory: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def unplanned(cls, settings: Any) -> "ResourcePlan":
        """CPUs and GPUs from settings, no memory reservation (nothing planned yet)."""
        return cls(settings.resources.cpus_per_trial, settings.resources.gpus_per_trial, {})

    def with_memory(self, memory: Mapping[str, int]) -> "ResourcePlan":
        return ResourcePlan(self.cpus, self.gpus, dict(memory))

    def memory_of(self, stage: str) -> int:
        return int(self.memory.get(stage, 0))

    def unit(self, stage: str) -> Resources:
        """What one unit of ``stage`` reserves."""
        return Resources(cpus=self.cpus, gpus=self.gpus, memory=self.memory_of(stage))


def plan_resources(ctx: Any, executor: Nodes, say: Callable[[str], None]) -> ResourcePlan:
    """Before compute: estimate each heavy unit's memory (persrep.pipeline.memory), check that it
    fits on some node (else one line, exit 2), print the plan, and return the reservations every
    stage requests."""
    nodes = executor.node_shapes()
    has_gpus = any(n.gpus > 0 for n in nodes)
    on_gpu = has_gpus and ctx.settings.resources.gpus_per_trial > 0
    requests = stage_requests(ctx.settings, has_gpus)
    sequential = executor.sequential
    if sequential and nodes:  # one unit at a time in this process: CPU and GPU requests reserve nothing
        most_cpus, most_gpus = max(n.cpus for n in nodes), max(n.gpus for n in nodes)
        requests = {s: (min(c, most_cpus), min(g, most_gpus)) for s, (c, g) in requests.items()}
    counts = count_units(ctx.settings, len(ctx.instances), len(set(ctx.instances.values())))
    plans = plan_stages(ctx.settings, counts, nodes, requests, on_gpu)
    for p in plans:
        say(p.line() if not sequential else p.line().rsplit(";", 1)[0] + "; one at a time (in this process)")
    return ResourcePlan.unplanned(ctx.settings).with_memory({p.stage: p.estimate.bytes for p in plans})


class LazyPlan:
    """The run's plan, made by ``make()`` the first time it is asked for (a failed call is not
    repeated: its error stops the job); ``made`` says whether it was."""

    def __init__(self, make: Callable[[], ResourcePlan]):
        self._make: Callable[[], ResourcePlan] | None = make
        self._plan: ResourcePlan | None = None

    @classmethod
    def ready(cls, plan: ResourcePlan) -> "LazyPlan":
        lazy = cls(lambda: plan)
        lazy()
        return lazy

    @property
    def made(self) -> bool:
        return self._make is None

    def __call__(self) -> ResourcePlan:
        if self._make is not None:
            make, self._make = self._make, None
            self._plan = make()
        assert self._plan is not None
        return self._plan
