"""A run's results: the summary (:class:`RunSummary`), the headline table, and what is written to
``<root>/runs/<run_id>/`` (results.parquet, summary.json, summary.md, units.json, settings.yaml,
failures/, the report) and to MLflow (:func:`write_results`).

The headline table: per backbone x data configuration x task, pretrained vs personalised.

Headline metric per task (as in the paper's tables): classification AP (PR-AUC), retrieval NDCG,
detection and segmentation mAP@[.5:.95]; scene "all"; mean over instances. The pretrained
baseline is computed once per backbone and compared with each data configuration's adapters
on the same instances. A backbone without any evaluated adapter has no row (not a row of ``nan``):
one line under the table names it and why (:func:`adapterless_line`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import yaml

from persrep.config import settings_to_dict
from persrep.evaluation.aggregate import HEADLINE
from persrep.pipeline.context import RunContext
from persrep.pipeline.executor import Outcome
from persrep.pipeline.unit_stats import stage_costs, unit_record

COLUMNS = ["backbone", "data_config", "task", "metric", "pretrained", "personalised", "delta",
           "improved", "n", "fallback"]
FALLBACK = "real_only_fallback"  # positives_used of an adapter trained on the real photos instead


def headline_table(frame: pd.DataFrame) -> pd.DataFrame:
    if frame.empty:
        return pd.DataFrame(columns=COLUMNS)
    ok = frame[(frame["status"] == "ok") & (frame["scene"] == "all")]
    ok = ok[[HEADLINE.get(t) == m for t, m in zip(ok["task"], ok["metric"])]]
    pre = ok[ok["model"] == "pretrained"]
    per = ok[ok["model"] == "personalised"]
    out = []
    for (bb, cfg, task), grp in per.groupby(["backbone", "data_config", "task"], sort=True):
        base = pre[(pre["backbone"] == bb) & (pre["task"] == task) & pre["instance"].isin(grp["instance"])]
        merged = grp.merge(base[["instance", "value"]], on="instance", suffixes=("", "_pre"))
        if merged.empty:
            continue
        fallback = int((merged["positives_used"] == FALLBACK).sum()) if "positives_used" in merged else 0
        out.append({"backbone": bb, "data_config": cfg, "task": task, "metric": HEADLINE[task],
                    "pretrained": merged["value_pre"].mean(), "personalised": merged["value"].mean(),
                    "delta": (merged["value"] - merged["value_pre"]).mean(),
                    "improved": int((merged["value"] > merged["value_pre"]).sum()), "n": len(merged),
                    "fallback": fallback})
    return pd.DataFrame(out, columns=COLUMNS)


def adapterless_line(backbones: list[str], table: pd.DataFrame, failures: list[dict]) -> str | None:
    """One line naming the run's backbones that have no row in ``table`` (no adapter evaluated)
    and why, from the run's failures (``RunSummary.failures``); None when every backbone has rows.
    Such backbones are left out of the table rather than shown as ``nan`` rows."""
    have = set(table["backbone"]) if len(table) else set()
    missing = [b for b in dict.fromkeys(backbones) if b not in have]
    if not missing:
        return None
    parts = []
    for bb in missing:
        pz = [f for f in failures if f.get("stage") == "personalization" and f":{bb}:" in f":{f.get('unit', '')}:"]
        ev = [f for f in failures if f.get("stage") == "evaluation" and f":{bb}:" in f":{f.get('unit', '')}:"]
        upstream = [f for f in failures if f.get("stage") not in ("personalization", "evaluation")]
        if pz:
            why = f"{len(pz)} personalisation unit(s) failed, first: {pz[0].get('error')}"
        elif ev:
            why = f"{len(ev)} evaluation unit(s) failed, first: {ev[0].get('error')}"
        elif upstream:
            why = (f"no adapter was trained: {len(upstream)} unit(s) before personalisation failed, "
                   f"first ({upstream[0].get('stage')}): {upstream[0].get('error')}")
        else:
            why = "no adapter was trained (no usable training data was planned for it)"
        parts.append(f"{bb} ({why})")
    return "no adapter results for backbone(s) " + "; ".join(parts)


def format_summary(table: pd.DataFrame, note: str | None = None) -> str:
    if table.empty:
        return "no personalised results" + (f"\n{note}" if note else "")
    head = (f"{'backbone':24s} {'data config':28s} {'task':14s} {'metric':6s} "
            f"{'pretrained':>10s} {'personal.':>10s} {'delta':>8s} {'improved':>9s}")
    lines = [head, "-" * len(head)]
    for r in table.itertuples():
        lines.append(f"{r.backbone[:24]:24s} {r.data_config[:28]:28s} {r.task:14s} {r.metric:6s} "
                     f"{100 * r.pretrained:10.1f} {100 * r.personalised:10.1f} {100 * r.delta:+8.1f} "
                     f"{r.improved:>4d}/{r.n:<4d}"
                     + (f"  [{r.fallback} of {r.n} trained on real photos: {FALLBACK}]" if r.fallback else ""))
    if note:
        lines.append(note)
    return "\n".join(lines)


@dataclass
class RunSummary:
    """What a run did: per-stage counts and timings, failures and retries, notes, result rows."""

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
                self.traces[o.label] = o.trace or str(o.error)
        self.stages[stage] = counts
        self.timings[stage] = round(seconds, 2)

    @property
    def exit_code(self) -> int:
        return 1 if self.failures else 0


def write_results(ctx: RunContext, summary: RunSummary, tracker: Any) -> None:
    """The run's folder (results, settings, summary, units, failure tracebacks, the report) and
    its MLflow results."""
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
