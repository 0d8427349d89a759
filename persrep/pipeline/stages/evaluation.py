"""Evaluation (stage 7 of 7): the pretrained backbones on every instance (one unit per backbone)
and each adapter on its instance (one unit per adapter), result rows published under
``<root>/evaluations/<key>/results.parquet`` (+ the report's examples). The stage collects the
run's result rows and names every adapter trained on something other than its label.
"""

from __future__ import annotations

import io
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from persrep.config import BackboneSettings, content_key
from persrep.generation import shards
from persrep.keys import result_settings
from persrep.pipeline.context import RunContext
from persrep.pipeline.executor import Outcome
from persrep.pipeline.planned import PlannedStage, StageScope
from persrep.pipeline.stages.personalization import PersonalizeUnit
from persrep.pipeline.units import ADAPTERS, EVALUATIONS, Unit
from persrep.storage import Storage


def _publish_rows(ctx: RunContext, key: str, rows: list[dict[str, Any]], meta: dict[str, Any],
                  extra: dict[str, bytes] | None = None) -> None:
    import pyarrow as pa

    from persrep.evaluation.aggregate import results_frame

    table = pa.Table.from_pandas(results_frame(rows), preserve_index=False)
    ctx.storage.publish(EVALUATIONS, key, {"results.parquet": shards.table_bytes(table), **(extra or {})}, meta)


def read_rows(storage: Storage, key: str) -> list[dict[str, Any]]:
    data = storage.read_unit_file(EVALUATIONS, key, "results.parquet")
    return pq.read_table(io.BytesIO(data)).to_pylist()


def positives_used(adapter_meta: dict[str, Any]) -> dict[str, Any]:
    """What an adapter was really trained on, from its manifest: result-row columns."""
    m = adapter_meta.get("metrics", {})
    return {"positives_used": m.get("positives_source", "unknown"),
            "n_positives": int(m.get("num_positives", -1))}


@dataclass(frozen=True, eq=False)
class EvaluationUnit(Unit):
    """The pretrained backbone on every instance (``kind="pretrained"``), or one adapter on its
    instance (``kind="adapter"``); ``keys`` are the result rows' identifying columns."""

    kind: str  # pretrained | adapter
    backbone: BackboneSettings
    key: str
    keys: dict[str, Any]
    instance: str | None = None
    adapter_key: str | None = None

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.backbone.name}:{self.instance or 'all'}"


def run_evaluation_unit(ctx: RunContext, unit: EvaluationUnit) -> dict[str, Any]:
    """Evaluate the pretrained backbone (all instances) or one adapter (its instance)."""
    from persrep.evaluation.stage import Evaluator

    key = unit.key
    if ctx.storage.is_intact(EVALUATIONS, key):
        return {"status": "skipped", "key": key}
    t0 = time.perf_counter()
    bs: BackboneSettings = unit.backbone
    ev = Evaluator(ctx.dataset, ctx.settings.evaluation)
    if unit.kind == "pretrained":
        rows = ev.evaluate_pretrained(bs, sorted(ctx.instances), unit.keys)
    else:
        from persrep.contrastive.train import ADAPTER

        man = ctx.storage.manifest(ADAPTERS, unit.adapter_key)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / ADAPTER
            path.write_bytes(ctx.storage.read_unit_file(ADAPTERS, unit.adapter_key, ADAPTER, man))
            rows = ev.evaluate_adapter(bs, unit.instance, path, {**unit.keys, **positives_used(man.meta)})
    _publish_rows(ctx, key, rows, {"kind": unit.kind, "backbone": bs.name,
                                   "seconds": time.perf_counter() - t0},
                  {"examples.json": json.dumps(ev.last_examples).encode()})  # the report's gallery
    return {"status": "done", "key": key, "rows": len(rows), "seconds": time.perf_counter() - t0}


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
    # the pretrained backbone has no adapter to scale or blend: those settings stay out of its key
    ev_key = {k: v for k, v in result_settings(ev, "evaluation").items()
              if k not in ("adapter_scale", "pretrained_share")}
    return [EvaluationUnit("pretrained", bs, content_key(
        "eval-pretrained", bs, ev_key, ctx.dataset_key, sorted(ctx.instances)),
        {"backbone": bs.name, "data_config": "-", "generator": "-", "cfg": float("nan"),
         "caption_source": "-", "adapter_key": "-", "positives_used": "-", "n_positives": -1, **common})
        for bs in ctx.settings.personalization.backbones]


def planned(scope: StageScope) -> PlannedStage:
    """Evaluation: pretrained once per backbone (all instances), then each adapter that exists
    (``scope.adapters``); the run's result rows go to the summary."""
    def plan() -> list[EvaluationUnit]:
        return pretrained_eval_units(scope.ctx) + [adapter_eval_unit(scope.ctx, u) for u in scope.adapters]

    def report(units: list[EvaluationUnit], outs: list[Outcome]) -> None:
        collect_rows(scope, units, outs)

    return PlannedStage("evaluation", plan, run_evaluation_unit, lambda u: u.label, report=report, always=True)


def collect_rows(scope: StageScope, ev_units: list[EvaluationUnit], outs: list[Outcome]) -> None:
    """The run's result rows (evaluation units that did not fail), and one line per adapter
    trained on the real photos instead of its synthetic positives."""
    summary, ctx, say = scope.summary, scope.ctx, scope.progress
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
