"""The final summary table: per backbone x data configuration x task, pretrained vs personalised.

Headline metric per task (as in the paper's tables): classification AP (PR-AUC), retrieval NDCG,
detection and segmentation mAP@[.5:.95]; scene "all"; mean over instances. The pretrained
baseline is computed once per backbone and compared with each data configuration's adapters
on the same instances. A backbone without any evaluated adapter has no row (not a row of ``nan``):
one line under the table names it and why (:func:`adapterless_line`).
"""

from __future__ import annotations

import pandas as pd

from persrep.evaluation.aggregate import HEADLINE
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
