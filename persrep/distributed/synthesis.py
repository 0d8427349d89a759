"""The synthesis stage on Ray Data: one row table, an actor pool that keeps generators loaded.

:class:`SynthesisStage` runs the stage (``RayExecutor`` declares :class:`RayDataSynthesis`, its stage
runner, for the synthesis stage) instead of one Ray task per unit. It produces exactly what
:func:`persrep.pipeline.stages.synthesis.run_synthesis_unit`
produces for each unit (same rows, same pixels, same parquet layout and manifest), so
:func:`persrep.generation.shards.read_unit` and every later stage read either.

How it runs
-----------
1. Units already published (``storage.is_finished``) are skipped up front; when nothing is
   left the stage says so and starts no Ray work at all.
2. The remaining units become a row table, one row per image to draw: unit key, group, the unit's
   generator / instance / generator key, the row's position in its unit (``pos``) and every
   :class:`~persrep.generation.base.SampleRow` field. Units are ordered by sampler, i.e.
   ``(generator, instance, generator_key)``, so rows that need the same loaded generator are
   contiguous. Each *block* of the dataset holds one sampling chunk of one unit, aligned exactly
   like ``run_synthesis_unit``'s chunks (``pos // synthesis.batch_size``), so an actor draws the
   same batches the in-process loop draws.
3. ``map_batches`` runs :class:`SynthesisWorker` on ``ActorPoolStrategy(size=n)``: one actor per
   GPU (``num_gpus=1``) when the cluster has GPUs, else one per CPU with fractional
   ``num_cpus=resources.cpus_per_actor`` (default 0.5; a pool of 1-CPU actors on a 2-CPU machine
   deadlocks Ray Data). Fake GPUs are fine: the device is picked from ``torch.cuda`` inside the
   generator, never from Ray. Each actor sets ``torch.set_num_threads`` explicitly (its whole CPUs,
   at least 1): on CPU, PyTorch's reductions depend on the thread count (measured: the tiny
   DreamBooth UNet gives 1 of 3072 pixel values off by 1 at 1 vs 2 threads), so images are
   bit-identical to the in-process path *at the same thread count*.
4. An actor keeps a small LRU cache of loaded samplers keyed by ``(generator, generator_key,
   instance)``. It loads a generator the first time it sees one of its rows and reuses it for every
   later batch: loads per stage are at most (actors x distinct generators), independent of the
   number of batches. Every output row carries the id of the load that drew it, so the driver
   counts loads exactly (including reloads after an actor restart) and reports them per instance.
5. Within a batch the actor replicates ``run_synthesis_unit``'s row logic: sample the chunk (through
   :func:`persrep.pipeline.stages.synthesis.draw_chunk`, the same body, filter included); if the chunk raises, each row is
   retried alone, and a row that still raises is recorded with its error, its batch-mates complete.
   A generator that cannot be loaded fails its unit (nothing published, retried in the next pass),
   as a raising ``run_synthesis_unit`` would; unless the retry policy (``persrep.pipeline.retry``)
   says the same inputs fail again (an empty mask, a missing key): then the unit fails once.

Where rows are collected, and why on the driver
-----------------------------------------------
The driver streams the pool's output with ``iter_batches`` and publishes a unit (shards, then the
manifest, through :func:`~persrep.generation.shards.publish_unit`) as soon as its last row arrives,
then drops its rows. Driver memory is bounded by the units in flight (rows are contiguous per unit,
so that is about one unit per actor), not by the stage. Publishing on the driver keeps three
properties simple and testable: (a) exactly-once rows: a batch's output reaches the driver only if
its actor task completed, and the driver also drops any repeat of a ``(unit, pos, attempt)``;
(b) the shards of a unit are written in the in-process order whatever actor drew which part;
(c) the manifest is written last by one process. At the paper's scale (512 px PNGs, ~0.4 MB each,
450 rows per unit) a unit is ~0.2 GB in flight; writing shards from the actors and publishing
only manifests on the driver would be the next step if that ever became a bottleneck.

Faults
------
- A dead actor (OOM, segfault, killed node) is restarted (``max_restarts``) and its in-flight
  batch re-run on it (``max_task_retries``); both are set explicitly from ``max_retries`` (Ray
  Data's own default is unbounded: a row that kills its process every time would loop). Ray 2.60
  has no named ``map_batches`` parameter for them and deprecates passing them as remote args
  (removal planned for 2.64): when upgrading, drop them and rely on the defaults plus the timeouts
  below. Output of a batch whose task died never reaches the driver, and the driver drops any
  repeat of a ``(unit, pos, attempt)``, so no row is lost or doubled.
- Exceptions from user code never escape the UDF (they are recorded per row, or fail a unit), so
  Ray Data's "no retry of user exceptions" default is kept on purpose: anything escaping is a bug
  and fails the pass fast instead of silently dropping blocks.
- If a pass fails anyway (retries exhausted, execution timeout), the units published so far stay
  published; the stage re-runs only the missing units, up to ``max_retries`` more passes, then
  reports what is still missing as failed. A killed driver is the same story one level up: a re-run
  finds the published units finished and regenerates only the rest.
- ``DataContext.execution_no_progress_timeout_s`` and ``wait_for_min_actors_s`` are set so a pool
  that hangs (a known upstream failure mode with dead actors) ends the pass instead of the job.
"""

from __future__ import annotations

import json
import os
import time
import uuid
import warnings
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import pyarrow as pa

from persrep.generation import shards
from persrep.generation.base import SampleRow
from persrep.pipeline.executor import Outcome, StageJob, StageOutcomes, StageRunner, failed_outcome, short_error
from persrep.pipeline.progress import Progress, as_progress
from persrep.pipeline.resource_plan import ResourcePlan
from persrep.pipeline.retry import POLICY
from persrep.pipeline.stages.synthesis import SynthesisUnit, synthesis_outcome
from persrep.pipeline.units import UnitRejected

SamplerFactory = Callable[[Any, SynthesisUnit], Any]

ROW_FIELDS = [f.name for f in fields(SampleRow)]
INPUT_SCHEMA = pa.schema([
    ("unit_key", pa.string()), ("unit_group", pa.string()), ("unit_generator", pa.string()),
    ("unit_instance", pa.string()), ("generator_key", pa.string()), ("pos", pa.int32()),
    ("instance", pa.string()), ("role", pa.string()), ("generator", pa.string()), ("prompt", pa.string()),
    ("cfg", pa.float64()), ("seed", pa.int64()), ("caption_source", pa.string()), ("index", pa.int64()),
])
# bookkeeping columns the workers add to each shard row (dropped before publishing)
EXTRA_SCHEMA = pa.schema([
    ("unit_key", pa.string()), ("pos", pa.int32()), ("attempt", pa.int32()), ("last", pa.bool_()),
    ("fallback", pa.bool_()), ("fatal", pa.string()), ("load_id", pa.string()), ("actor", pa.string()),
    ("node", pa.string()), ("cold", pa.string()), ("rejected", pa.bool_()),
])
OUTPUT_SCHEMA = pa.schema(list(shards.SCHEMA) + [f for f in EXTRA_SCHEMA])
EXTRA_NAMES = set(EXTRA_SCHEMA.names) - set(shards.SCHEMA.names)


@dataclass
class _UnitState:
    unit: SynthesisUnit
    attempts: int = 0
    records: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)
    final: set[int] = field(default_factory=set)
    fallback_chunks: set[int] = field(default_factory=set)
    fatal: str | None = None
    rejected: bool = False  # its fatal error is one the same inputs raise again: no further pass
    first_seen: float | None = None
    published: bool = False


# ---------------------------------------------------------------------------------------------
# the actor
class SynthesisWorker:
    """Ray Data callable class: draws a batch of rows with cached samplers (one LRU per actor)."""

    def __init__(self, ctx: Any, sampler_factory: SamplerFactory | None = None, cache_size: int = 2,
                 torch_threads: int | None = None):
        t_init = time.time()
        import ray

        self.cold = cold_start_clock(t_init, needs_diffusion(ctx.settings))
        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)  # explicit: CPU pixels depend on it (see module doc)
        self.ctx = ctx
        self.factory = sampler_factory
        self.cache_size = max(1, int(cache_size))
        self.cache: OrderedDict[tuple[str, str, str], tuple[Any, Any, str]] = OrderedDict()
        self.failed: dict[tuple[str, str, str], str] = {}
        self.rejected: set[tuple[str, str, str]] = set()  # load failures the retry policy rejects
        self.loads = 0
        self.incarnation = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"  # new after each restart
        try:
            self.node = ray.get_runtime_context().get_node_id()
        except Exception:  # noqa: BLE001 - only informative
            self.node = ""
        self.cold["init_done"] = time.time()

    def _loaded(self, unit: SynthesisUnit) -> tuple[Any, Any, str]:
        key = (unit.generator, unit.generator_key or "", unit.instance)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        if key in self.failed:  # one load attempt per actor and pass: the unit fails and is retried
            raise RuntimeError(self.failed[key])
        from persrep.pipeline.stages.synthesis import open_sampler, unit_scorer

        t_load = time.time()
        try:
            sampler = (self.factory or open_sampler)(self.ctx, unit)
            scorer = unit_scorer(self.ctx, unit)
        except Exception as exc:  # fails the unit (recorded by the caller), not the actor
            self.failed[key] = short_error(exc) if POLICY.retryable(exc) else POLICY.line(exc)
            if not POLICY.retryable(exc):
                self.rejected.add(key)
            raise
        self.loads += 1
        if self.cold is not None and "first_load_s" not in self.cold:
            self.cold["first_load_s"] = round(time.time() - t_load, 3)
        entry = (sampler, scorer, f"{self.incarnation}/{self.loads}")
        self.cache[key] = entry
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)  # least recently used
        return entry

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        out: list[dict[str, Any]] = []
        syn = self.ctx.settings.synthesis
        # group the batch by (unit, in-process chunk), keeping order
        chunks: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for r in rows:
            if r["unit_key"]:  # blank rows only pad a unit's last chunk
                chunks.setdefault((r["unit_key"], r["pos"] // syn.batch_size), []).append(r)
        for part in chunks.values():
            head = part[0]
            unit = SynthesisUnit(head["unit_group"], head["unit_generator"], head["unit_instance"], [],
                                 head["generator_key"] or None, head["unit_key"])
            sample_rows = [SampleRow(**{k: r[k] for k in ROW_FIELDS}) for r in part]
            try:
                sampler, scorer, load_id = self._loaded(unit)
            except Exception as exc:  # noqa: BLE001
                gkey = (unit.generator, unit.generator_key or "", unit.instance)
                fatal = self.failed.get(gkey) or short_error(exc)
                for r, sr in zip(part, sample_rows):
                    out.append(self._extra(shards.record(None, sr, unit.key, error=fatal), r,
                                           _RowTag(0, True, False, fatal, "", gkey in self.rejected)))
                continue
            out += self._draw(sampler, scorer, unit.key, part, sample_rows, load_id)
        if self.cold is not None and out:  # the actor's first batch: its cold start rides on one row
            self.cold["first_batch_done"] = time.time()
            out[0]["cold"] = json.dumps(self.cold)
            self.cold = None
        return pa.Table.from_pylist(out, schema=OUTPUT_SCHEMA)

    def _draw(self, sampler, scorer, key: str, part: list[dict[str, Any]], sample_rows: list[SampleRow],
              load_id: str) -> list[dict[str, Any]]:
        """``run_synthesis_unit``'s inner loop for one chunk (or part of one): the same body."""
        from persrep.pipeline.stages.synthesis import draw_chunk

        flt = self.ctx.settings.synthesis.filter

        def tag(records: list[dict[str, Any]], rows_in: list[dict[str, Any]], fallback: bool) -> list[dict[str, Any]]:
            # records come per row in attempt order; the k-th record of a row is attempt k
            by_index = {r["index"]: r for r in rows_in}
            seen: dict[int, int] = defaultdict(int)
            last_at: dict[int, int] = {}
            tagged = []
            for rec in records:
                src = by_index[rec["index"]]
                attempt = seen[src["pos"]]
                seen[src["pos"]] += 1
                last_at[src["pos"]] = len(tagged)
                tagged.append(self._extra(rec, src, _RowTag(attempt, False, fallback, None, load_id)))
            for i in last_at.values():
                tagged[i]["last"] = True
            return tagged

        parts, fell_back = draw_chunk(sampler, scorer, sample_rows, key, flt)
        if not fell_back:
            return tag(parts[0], part, False)
        return [rec for src, recs in zip(part, parts) for rec in tag(recs, [src], True)]

    def _extra(self, rec: dict[str, Any], src: dict[str, Any], tag: "_RowTag") -> dict[str, Any]:
        return {**rec, "unit_key": src["unit_key"], "pos": src["pos"], "attempt": tag.attempt, "last": tag.last,
                "fallback": tag.fallback, "fatal": tag.fatal, "load_id": tag.load_id, "actor": self.incarnation,
                "node": self.node, "cold": None, "rejected": tag.rejected}


@dataclass(frozen=True)
class _RowTag:
    """The bookkeeping a worker adds to one output row (EXTRA_SCHEMA), besides where it ran."""

    attempt: int
    last: bool = False
    fallback: bool = False  # its chunk was drawn row by row
    fatal: str | None = None  # its unit's generator could not be loaded
    load_id: str = ""
    rejected: bool = False  # that failure is one the retry policy rejects


def needs_diffusion(settings: Any) -> bool:
    """Whether this stage's samplers import diffusers (DreamBooth variants, the base model for
    generated negatives or backgrounds); cut-and-paste alone does not."""
    from persrep.generation.base import any_generator

    return (any_generator(settings.generator.types, lambda c: c.needs_base_model)
            or settings.personalization.negatives == "generated"
            or settings.generator.cut_paste.backgrounds == "generated")


def cold_start_clock(t_init: float, diffusion: bool = True) -> dict[str, Any]:
    """An actor's cold-start timestamps (wall clock, so the driver can line them up with its own):
    process start, constructor entry, and after the heavy imports (torch, and diffusers when the
    stage's samplers need it) that its first generator load would otherwise pay for."""
    clock: dict[str, Any] = {"pid": os.getpid(), "init_start": t_init}
    try:
        import psutil

        clock["process_start"] = psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - only informative
        pass
    t = time.time()
    import torch  # noqa: F401 - timed here: the first load would pay for it otherwise

    if diffusion:
        import diffusers  # noqa: F401

    clock["imports_s"] = round(time.time() - t, 3)
    return clock


def cold_start_summary(clocks: list[dict[str, Any]], t_pass_wall: float) -> dict[str, Any]:
    """The stage's cold start itemised from its actors' clocks (seconds after the pass began):
    actor process start, actor ready (imports + constructor), first generator load, first batch."""
    if not clocks:
        return {}

    def span(name: str, ref: str | None = None) -> list[float]:
        return [round(c[name] - (c[ref] if ref else t_pass_wall), 3) for c in clocks if name in c
                and (ref is None or ref in c)]

    out = {"actors": len(clocks),
           "process_started_s": span("process_start"),
           "constructor_entered_s": span("init_start"),
           "imports_s": [c.get("imports_s") for c in clocks],
           "actor_ready_s": span("init_done"),
           "first_generator_load_s": [c.get("first_load_s") for c in clocks],
           "first_batch_done_s": span("first_batch_done")}
    return out


# ---------------------------------------------------------------------------------------------
# the driver
def _sampler_key(u: SynthesisUnit) -> tuple[str, str, str]:
    return (u.generator, u.instance, u.generator_key or "")


def row_blocks(units: Sequence[SynthesisUnit], batch_size: int) -> list[pa.Table]:
    """The row table as blocks: units sorted by sampler, one block per in-process sampling chunk.

    A unit's last chunk is padded to ``batch_size`` with blank rows (``unit_key == ""``, skipped by
    the workers): every block then holds exactly one batch, so Ray Data never bundles the tail of
    one unit with the head of the next and the actors draw exactly ``run_synthesis_unit``'s batches.
    """
    blocks = []
    pad = {name: None for name in INPUT_SCHEMA.names} | {"unit_key": "", "pos": -1}
    for u in sorted(units, key=lambda u: (_sampler_key(u), u.group, u.key)):
        base = {"unit_key": u.key, "unit_group": u.group, "unit_generator": u.generator,
                "unit_instance": u.instance, "generator_key": u.generator_key or ""}
        for start in range(0, len(u.rows), batch_size):
            items = [{**base, "pos": start + j, **asdict(r)}
                     for j, r in enumerate(u.rows[start:start + batch_size])]
            items += [pad] * (batch_size - len(items))
            blocks.append(pa.Table.from_pylist(items, schema=INPUT_SCHEMA))
    return blocks


def pool_shape(ctx: Any, n_blocks: int, num_actors: int | None = None,
               use_gpus: bool | None = None, memory: int = 0) -> tuple[int, dict[str, float]]:
    """(actors, per-actor resources): one actor per GPU, else one per CPU at fractional CPUs;
    ``memory``: the bytes an actor reserves (the run's plan), 0 for none."""
    import ray

    res = ctx.settings.resources
    cluster = ray.cluster_resources()
    gpus = int(cluster.get("GPU", 0))
    if use_gpus is None:
        use_gpus = gpus > 0
    if use_gpus:
        if gpus < 1:
            raise ValueError("use_gpus=True but the Ray cluster has no GPU")
        n = num_actors or gpus
        per = {"num_gpus": 1.0, "num_cpus": res.cpus_per_actor}
    else:
        # never more actors than the CPUs hold at cpus_per_actor each: a pool whose actors cannot
        # all start waits for them forever (found by bench/paper_dryrun.py with cpus_per_actor=2)
        cpus = cluster.get("CPU", 1)  # one actor per CPU, fewer when an actor asks for more than one
        n = num_actors or max(1, int(min(cpus, cpus // max(res.cpus_per_actor, 1e-6))))
        per = {"num_gpus": 0.0, "num_cpus": res.cpus_per_actor}
    if memory > 0:  # the run's plan (persrep.pipeline.memory): only as many actors as fit
        from persrep.distributed.session import node_shapes
        from persrep.pipeline.memory import GIB, concurrency

        per["memory"] = float(memory)
        fits = sum(concurrency(nd, per["num_cpus"], per["num_gpus"], memory / GIB) for nd in node_shapes())
        n = min(n, max(1, fits))
    return max(1, min(n, n_blocks)), per


def _order_key(batch_size: int, fallback_chunks: set[int]):
    def key(rec: dict[str, Any]) -> tuple[int, int, int]:
        chunk = rec["pos"] // batch_size
        # in-process order: (attempt, row) within a chunk, or (row, attempt) if the chunk fell back
        if chunk in fallback_chunks:
            return (chunk, rec["pos"], rec["attempt"])
        return (chunk, rec["attempt"], rec["pos"])
    return key


@dataclass
class SynthesisStage:
    """The synthesis stage on Ray Data: its options as state, ``run(units)`` the stage.

    ``run`` returns one :class:`Outcome` per unit (input order): ``skipped`` (published before),
    ``done`` (value as ``run_synthesis_unit``'s: key, rows, kept, errors, seconds) or ``failed``
    (its generator could not be loaded, or it was still missing after ``max_retries`` extra passes).
    ``.stats`` has the stage's totals (rows, errors, generator loads, actors, passes, ...).
    ``num_actors`` / ``use_gpus`` override the pool sizing; ``sampler_factory(ctx, unit)``
    replaces :func:`persrep.pipeline.stages.synthesis.open_sampler` (tests inject faults through it).
    ``torch_threads``: intra-op threads per actor (default: the actor's whole CPUs, at least 1).
    ``plan()`` runs once there is a unit to draw, before Ray is used, and returns the run's
    resource plan (the job's cluster start and memory plan: a stage with every unit published
    needs neither; without it an actor reserves no memory).
    """

    ctx: Any
    progress: Progress | Callable[[str], None] | None = None
    max_retries: int | None = None  # None: resources.max_retries
    num_actors: int | None = None
    use_gpus: bool | None = None
    cache_size: int = 2
    sampler_factory: SamplerFactory | None = None
    no_progress_timeout_s: float = 1800.0
    torch_threads: int | None = None
    plan: Callable[[], ResourcePlan] | None = None
    _memory: int = field(default=0, init=False, repr=False)  # bytes per actor, from ``plan()``

    def run(self, units: list[SynthesisUnit]) -> StageOutcomes:
        from persrep.distributed.session import ensure_ray

        ctx = self.ctx
        say = as_progress(self.progress)
        max_retries = ctx.settings.resources.max_retries if self.max_retries is None else self.max_retries
        t_stage = time.perf_counter()
        keys = [u.key for u in units]
        if len(set(keys)) != len(keys) or not all(keys):
            raise ValueError("synthesis units need distinct, non-empty keys (set unit.key = synthesis_key(...))")
        syn = ctx.settings.synthesis
        outcomes: dict[str, Outcome] = {}
        states: dict[str, _UnitState] = {}
        for u in units:
            man = ctx.storage.intact_manifest(shards.STAGE, u.key)  # its meta: no second manifest read
            if man is not None:
                outcomes[u.key] = _checked(ctx, u, "skipped", man.meta, 1, 0.0)
            else:
                states[u.key] = _UnitState(u)
        stats: dict[str, Any] = {"units": len(units), "skipped": len(units) - len(states), "rows": 0, "kept": 0,
                                 "errors": 0, "loads": 0, "actors": 0, "incarnations": 0, "nodes": 0,
                                 "duplicates": 0, "passes": 0, "batches": 0, "per_instance": {}, "load_ids": {}}
        if not states:
            say(f"synthesis: all {len(units)} units already published; nothing to generate")
            return _finish(units, outcomes, stats, t_stage, say)
        if self.plan is not None:
            self._memory = self.plan().memory_of("synthesis")

        load_ids: dict[str, set[str]] = defaultdict(set)  # "generator:instance" -> load ids
        actors: set[str] = set()
        nodes: set[str] = set()
        per_instance: dict[str, dict[str, int]] = defaultdict(lambda: {"rows": 0, "kept": 0, "errors": 0})

        def publish(st: _UnitState) -> None:
            u = st.unit
            recs = sorted(st.records.values(), key=_order_key(syn.batch_size, st.fallback_chunks))
            name = f"{u.generator}:{u.instance}"
            for r in recs:
                if r["load_id"]:
                    load_ids[name].add(r["load_id"])
                if r["actor"]:
                    actors.add(r["actor"])
                if r["node"]:
                    nodes.add(r["node"])
            clean = [{k: v for k, v in r.items() if k not in EXTRA_NAMES} for r in recs]
            seconds = time.perf_counter() - (st.first_seen or t_stage)
            meta = shards.publish_unit(ctx.storage, u.key, clean, syn.rows_per_shard,
                                       {"group": u.group, "generator": u.generator, "instance": u.instance,
                                        "seconds": seconds, "runner": "ray-data"})
            errors, kept = meta["errors"], meta["kept"]
            outcomes[u.key] = _checked(ctx, u, "done", meta, st.attempts, time.perf_counter() - t_stage)
            pi = per_instance[name]
            pi["rows"] += len(clean)
            pi["kept"] += kept
            pi["errors"] += errors
            stats["rows"] += len(clean)
            stats["kept"] += kept
            stats["errors"] += errors
            st.records.clear()
            st.published = True

        ensure_ray(ctx.settings.resources)
        pending = list(states)
        for pass_no in range(max_retries + 1):
            if not pending:
                break
            stats["passes"] += 1
            for k in pending:
                st = states[k]
                st.attempts += 1
                st.records.clear()
                st.final.clear()
                st.fallback_chunks.clear()
                st.fatal = None
                st.rejected = False
            for k in [k for k in pending if not states[k].unit.rows]:  # an empty unit: publish it now
                publish(states[k])
            todo = [states[k].unit for k in pending if states[k].unit.rows]
            pass_error = None
            if todo:
                say(f"synthesis: pass {pass_no + 1}: {len(todo)} units, {sum(len(u.rows) for u in todo)} rows")
                try:
                    self._pass(todo, states, publish, stats, max_retries, say)
                except Exception as exc:  # noqa: BLE001 - a failed pass keeps what it published
                    pass_error = short_error(getattr(exc, "cause", None) or exc)
                    say(f"synthesis: pass {pass_no + 1} stopped: {pass_error}; published units are kept")
            pending = []
            for u in todo:
                st = states[u.key]
                if st.published:
                    continue
                error = st.fatal or pass_error or f"{len(u.rows) - len(st.final)} of {len(u.rows)} rows missing"
                if pass_no < max_retries and not st.rejected:  # rejected: the same inputs fail again
                    say.on_retry("synthesis", u.group, st.attempts + 1, error)
                    pending.append(u.key)
                else:
                    outcomes[u.key] = Outcome(u.group, "failed", {}, error, st.attempts, time.perf_counter() - t_stage)
        stats["per_instance"] = {k: {**v, "loads": len(load_ids[k])} for k, v in per_instance.items()}
        stats["loads"] = len(set().union(*load_ids.values())) if load_ids else 0
        stats["load_ids"] = {k: sorted(v) for k, v in load_ids.items()}
        stats["incarnations"] = len(actors)
        stats["nodes"] = len(nodes)
        return _finish(units, outcomes, stats, t_stage, say)

    def _pass(self, todo: list[SynthesisUnit], states: dict[str, _UnitState], publish: Callable,
              stats: dict[str, Any], max_retries: int, say: Progress) -> None:
        """One pass of the actor pool over ``todo``'s rows; units are published as they complete."""
        import ray

        ctx, no_progress_timeout_s = self.ctx, self.no_progress_timeout_s
        syn = ctx.settings.synthesis
        blocks = row_blocks(todo, syn.batch_size)
        n, per = pool_shape(ctx, len(blocks), self.num_actors, self.use_gpus, self._memory)
        stats["actors"] = max(stats["actors"], n)
        stats["batches"] += len(blocks)
        retries = max(1, max_retries)
        each = "1 GPU" if per["num_gpus"] else f"{per['num_cpus']:g} CPU"
        say(f"synthesis: {len(blocks)} batches on {n} actor(s) ({each} each)")
        dctx = ray.data.DataContext.get_current()
        saved = {k: getattr(dctx, k) for k in ("execution_no_progress_timeout_s", "wait_for_min_actors_s",
                                               "max_consecutive_actor_init_deaths", "actor_task_retry_on_errors")}
        try:
            dctx.execution_no_progress_timeout_s = float(no_progress_timeout_s)
            dctx.wait_for_min_actors_s = int(no_progress_timeout_s)
            dctx.max_consecutive_actor_init_deaths = retries
            dctx.actor_task_retry_on_errors = False  # user errors are handled per row inside the UDF
            ds = ray.data.from_arrow(blocks)
            with warnings.catch_warnings():
                # max_restarts / max_task_retries have no named map_batches parameter in Ray 2.60; passing
                # them as remote args is deprecated (removal planned for 2.64), still the only explicit way
                warnings.filterwarnings("ignore", message=".*ray_remote_args. is deprecated")
                out = self._map(ds, n, per, retries)
            t_pass = time.perf_counter()
            t_pass_wall = time.time()
            clocks: list[dict[str, Any]] = []
            for batch in out.iter_batches(batch_size=None, batch_format="pyarrow"):
                if "first_output_s" not in stats:  # cold start: actors up, generators loaded, first batch drawn
                    stats["first_output_s"] = round(time.perf_counter() - t_pass, 2)
                rows = batch.to_pylist()
                clocks += [json.loads(r["cold"]) for r in rows if r.get("cold")]
                _collect(rows, states, publish, stats, syn.batch_size)
            stats.setdefault("cold_start", cold_start_summary(clocks, t_pass_wall))
        finally:
            for k, v in saved.items():
                setattr(dctx, k, v)

    def _map(self, ds, n: int, per: dict[str, float], retries: int):
        import ray

        return ds.map_batches(
            SynthesisWorker, batch_size=self.ctx.settings.synthesis.batch_size, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=n),
            fn_constructor_kwargs={"ctx": self.ctx, "sampler_factory": self.sampler_factory,
                                   "cache_size": self.cache_size,
                                   "torch_threads": self.torch_threads or max(1, int(per["num_cpus"]))},
            num_cpus=per["num_cpus"], num_gpus=per["num_gpus"] or None, memory=per.get("memory") or None,
            max_restarts=2 * retries + 1, max_task_retries=retries)


def _collect(rows: list[dict[str, Any]], states: dict[str, _UnitState], publish, stats: dict[str, Any],
             batch_size: int) -> None:
    touched = set()
    for r in rows:
        st = states.get(r["unit_key"])
        if st is None:
            continue
        if st.published:  # a repeat of a row whose unit is already out: never written twice
            stats["duplicates"] += 1
            continue
        if st.first_seen is None:
            st.first_seen = time.perf_counter()
        if r["fatal"]:
            st.fatal = st.fatal or r["fatal"]
            st.rejected = st.rejected or bool(r.get("rejected"))
            st.final.add(r["pos"])
            continue
        ident = (r["pos"], r["attempt"])
        if ident in st.records:
            stats["duplicates"] += 1
            continue
        st.records[ident] = r
        if r["last"]:
            st.final.add(r["pos"])
        if r["fallback"]:
            st.fallback_chunks.add(r["pos"] // batch_size)
        touched.add(r["unit_key"])
    for key in touched:
        st = states[key]
        if st.fatal is None and len(st.final) == len(st.unit.rows) and st.records:
            publish(st)


def _checked(ctx: Any, u: SynthesisUnit, status: str, meta: dict[str, Any] | None, attempts: int,
             seconds: float) -> Outcome:
    """A published unit's outcome after its verdict (the same as ``run_synthesis_unit``'s)."""
    try:
        return Outcome(u.group, status, synthesis_outcome(ctx, "", u.key, status, meta), None,
                       attempts, seconds)
    except UnitRejected as exc:
        return failed_outcome(u.group, exc, attempts, seconds)


def _finish(units, outcomes, stats, t_stage, say) -> StageOutcomes:
    result = StageOutcomes([outcomes[u.key] for u in units])
    stats["seconds"] = round(time.perf_counter() - t_stage, 2)
    stats["done"] = sum(o.status == "done" for o in result)
    stats["failed"] = sum(o.status == "failed" for o in result)
    result.stats = stats
    for name, v in sorted(stats["per_instance"].items()):
        say(f"synthesis {name}: {v['rows']} rows ({v['kept']} kept, {v['errors']} errors), "
            f"{v['loads']} generator load(s)")
    say(f"synthesis (ray data): {stats['done']} done, {stats['skipped']} skipped, {stats['failed']} failed; "
        f"{stats['rows']} rows, {stats['errors']} row errors; {stats['loads']} generator loads on "
        f"{stats['actors']} actor(s) in {stats['seconds']:.1f} s")
    return result


@dataclass
class RayDataSynthesis(StageRunner):
    """The executor's stage runner for synthesis: every unit on one Ray Data actor pool
    (:class:`SynthesisStage` with the job's progress and resource plan)."""

    max_retries: int
    how: str = "Ray Data"

    def run(self, job: StageJob) -> StageOutcomes:
        return SynthesisStage(job.ctx, job.progress, self.max_retries, plan=job.plan).run(job.units)
