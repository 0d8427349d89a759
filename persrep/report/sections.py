"""The report's first sections as HTML and Markdown: the verdict, the warnings (repeated ones
folded) and the per-instance table. Numbers come from :mod:`persrep.report.verdict`."""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Callable
from typing import Any

import pandas as pd

from persrep.report.notes import NoteGroup
from persrep.report.verdict import (RunCost, Verdict, config_words, cost_sentence, lead_sentence,
                                    metric_name, task_sentence)

HTML = list[str]
MD = list[str]


def md_table(head: list[str], rows: list[list[str]]) -> str:
    esc = [[str(c).replace("|", "\\|") for c in row] for row in rows]
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] +
                     ["| " + " | ".join(r) + " |" for r in esc])


# ---------------------------------------------------------------------------------------------
# verdict
def verdict_section(found: list[Verdict], table: pd.DataFrame, cost: RunCost | None, *,
                    auto_masks: bool, not_measured: list[str], instances: int,
                    one_backbone: bool) -> tuple[HTML, MD]:
    """The plain verdict: per personalised model (the best 3) what changed per task, how many
    instances have no personalised result, what was not measured, and the cost."""
    h: HTML = ['<section class="verdict"><h2>Verdict</h2>']
    md: MD = ["## Verdict", ""]
    if not found:
        line = "No personalised model has a result: nothing to compare with the pretrained backbone."
        h.append(f"<p class=\"lead\">{html.escape(line)}</p>")
        md += [line, ""]
    else:
        line = lead_sentence(found[0], cost)
        if len(found) > 1:
            line = line[:-1] + f" with the best of {len(found)} models: {config_words(found[0].data_config, auto_masks)}" + (
                "" if one_backbone else f" on {found[0].backbone}") + "."
        h.append(f'<p class="headline">{html.escape(line)}</p>')
        md += [f"**{line}**", ""]
    for v in found[:3]:
        who = config_words(v.data_config, auto_masks) + ("" if one_backbone else f", backbone {v.backbone}")
        head = f"Personalised with {who}:"
        h.append(f'<p class="lead">{html.escape(head)}</p><ul>')
        md += [f"**{head}**", ""]
        for t in v.tasks:
            cls = "pos" if t.delta > 0 else "neg" if t.delta < 0 else "zero"
            h.append(f'<li class="{cls}-line">{html.escape(task_sentence(t))}</li>')
            md.append(f"- {task_sentence(t)}")
        h.append("</ul>")
        md.append("")
    if len(found) > 3:
        line = (f"The 3 best of {len(found)} personalised models (by mean gain); every one is in the "
                "tables below.")
        h.append(f'<p class="cap">{html.escape(line)}</p>')
        md += [line, ""]
    more: list[str] = []
    if not table.empty:
        failed = sorted(set(table.loc[table["status"] != "ok", "instance"]))
        if failed:
            more.append(f"{len(failed)} of {instances} instances have no personalised result (their "
                        f"training data or adapter failed): {', '.join(failed[:8])}"
                        + (" …" if len(failed) > 8 else "") + ". They are listed at the end of the "
                        "per-instance table.")
        if "model_used" in table:
            kept = table[(table["status"] == "ok") & (table["model_used"].astype(str) == "pretrained")]
            if len(kept):
                n_ok = int((table["status"] == "ok").sum())
                more.append(f"The pretrained model was kept for {len(kept)} of {n_ok} personalised "
                            "instances (see 'model used' and 'why' in the per-instance table).")
    if not_measured:
        more.append(f"Not measured: {', '.join(not_measured)} (why: see the run details at the end).")
    if cost is not None:
        more.append(cost_sentence(cost))
    for line in more:
        h.append(f"<p>{html.escape(line)}</p>")
        md += [line, ""]
    h.append("</section>")
    return h, md


# ---------------------------------------------------------------------------------------------
# warnings
_ABS_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s/:'\"()]+/)+([^\s/:'\"()]+)/?")


def short_paths(text: str) -> str:
    """Absolute machine paths cut to their last component (``/work/shared/data/grocery_produce``
    -> ``…/grocery_produce``): the first screens name things, the run details say where."""
    return _ABS_PATH.sub(lambda m: f"…/{m[1]}", text)


def warnings_section(groups: list[NoteGroup], redact: Callable[[str], str],
                     thumbs: Callable[[dict[str, list[int]]], str] | None = None) -> tuple[HTML, MD]:
    """One yellow note per warning; a repeated warning is one expandable note, and the uncertain
    automatic masks one note with their thumbnails (``thumbs(instance -> indices)``)."""
    h: HTML = []
    md: MD = []
    for g in groups:
        summary = redact(g.summary)
        if not g.folded:
            h.append(f'<div class="note">{html.escape(summary)}</div>')
            md += [f"> {summary}", ""]
            continue
        if g.kind == "masks":
            listing = "".join(f"<li>{html.escape(i)}: train image{'s' if len(ix) != 1 else ''} "
                              f"{', '.join(f'#{k}' for k in ix)}</li>" for i, ix in sorted(g.low_masks.items()))
            try:
                pictures = thumbs(g.low_masks) if thumbs else ""
            except Exception as exc:  # noqa: BLE001 - the data set moved: the list still stands
                pictures = f"<p class=\"cap\">thumbnails not shown: {html.escape(redact(str(exc)))}</p>"
            body = pictures or f"<ul>{listing}</ul>"
            h.append(f'<details class="note fold"><summary>{html.escape(summary)}</summary>'
                     f'<p class="cap">Each row: an instance and its uncertain train images; every train '
                     f"photo is shown with its automatic mask outlined and the mask's confidence.</p>"
                     f"{body}</details>")
            md += [f"> {summary}", ">"] + [f"> - {i}: train images {', '.join(f'#{k}' for k in ix)}"
                                           for i, ix in sorted(g.low_masks.items())] + [""]
            continue
        items = "".join(f"<li>{html.escape(redact(i))}</li>" for i in g.items)
        h.append(f'<details class="note fold"><summary>{html.escape(summary)}</summary>'
                 f"<ul>{items}</ul></details>")
        md += [f"> {summary}", ">"] + [f"> - {redact(i)}" for i in g.items] + [""]
    return h, md


# ---------------------------------------------------------------------------------------------
# per instance
def _num(x: Any) -> str:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return "–"
    return f"{100 * f:.1f}" if math.isfinite(f) else "–"


def _delta(x: Any) -> tuple[str, str]:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return "–", "zero"
    if not math.isfinite(f):
        return "–", "zero"
    r = round(100 * f, 1)
    return ("±0.0" if r == 0 else f"{r:+.1f}"), ("pos" if r > 0 else "neg" if r < 0 else "zero")


def _positives(r: dict[str, Any]) -> str:
    used = str(r.get("positives_used", "-"))
    n = r.get("n_positives")
    try:
        n = int(n) if n is not None and math.isfinite(float(n)) else None
    except (TypeError, ValueError):
        n = None
    words = {"real_only_fallback": "real photos (fallback)", "synthetic": "synthetic",
             "synthetic+real": "synthetic + real photos",
             "real": "real photos", "-": "–"}.get(used, used.replace("_", " "))
    return f"{n} {words}" if n is not None and used != "-" else words


def failure_reasons(summary: dict[str, Any], instances: list[str], redact: Callable[[str], str]) -> dict[str, str]:
    """instance -> the first failed unit of it (``stage: error``, shortened)."""
    names = set(instances)
    out: dict[str, str] = {}
    for f in summary.get("failures") or []:
        label = str(f.get("unit", ""))
        inst = label.rsplit(":", 1)[-1]
        if inst in names and inst not in out:
            err = redact(str(f.get("error") or json.dumps(f, default=str))).splitlines()[0] if (
                f.get("error") or f) else ""
            out[inst] = f"{f.get('stage', '?')}: {err[:140]}" + ("…" if len(err) > 140 else "")
    return out


def instance_section(table: pd.DataFrame, *, threshold: float | None, failures: dict[str, str],
                     one_backbone: bool) -> tuple[HTML, MD]:
    """The per-instance table, sorted by gain (best first), failed instances last."""
    if table.empty:
        return [], []
    tasks = [c[:-len("_delta")] for c in table.columns if c.endswith("_delta")]
    show_gain = len(tasks) > 1
    show_dc = table.loc[table["status"] == "ok", "data_config"].nunique() > 1
    has_conf = "mask_confidence" in table and table["mask_confidence"].notna().any()
    extra = [c for c in ("model_used", "model_reason") if c in table]
    # one model for every personalised instance (e.g. the pretrained share of offline-real): said once
    # in the caption, not repeated on every row of a table that is already wider than a screen
    used = table.loc[table["status"] == "ok", "model_used"].astype(str) if "model_used" in extra else None
    same_model = used.iloc[0] if used is not None and len(used) and used.nunique() == 1 and (
        used.iloc[0] not in ("", "nan", "None")) else None
    if same_model is not None:
        extra.remove("model_used")
    has_note = (table["status"] != "ok").any() and "model_reason" not in table  # else in 'why'
    left = ["instance", "category"] + ([] if one_backbone else ["backbone"]) + (
        ["data config"] if show_dc else []) + ["positives"]
    right = (["gain"] if show_gain else []) + (["mask confidence"] if has_conf else []) + (
        ["model used"] if "model_used" in extra else []) + (["why"] if "model_reason" in extra else []) + (
        ["note"] if has_note else [])
    th1 = "".join(f'<th rowspan="2">{c}</th>' for c in left) + "".join(
        f'<th colspan="3" class="grp">{html.escape(t)} ({metric_name(t)})</th>' for t in tasks) + "".join(
        f'<th rowspan="2" class="num">{c}</th>' if c in ("gain", "mask confidence") else f'<th rowspan="2">{c}</th>'
        for c in right)
    th2 = "".join('<th class="num">pretrained</th><th class="num">personalised</th><th class="num">Δ</th>'
                  for _ in tasks)
    body, md_rows = [], []
    for r in table.to_dict("records"):
        cells = [html.escape(str(r["instance"])), html.escape(str(r.get("category", "-")))]
        mdc = [str(r["instance"]), str(r.get("category", "-"))]
        if not one_backbone:
            cells.append(html.escape(str(r["backbone"])))
            mdc.append(str(r["backbone"]))
        if show_dc:
            cells.append(html.escape(str(r["data_config"])))
            mdc.append(str(r["data_config"]))
        cells.append(html.escape(_positives(r)))
        mdc.append(_positives(r))
        num = []
        for t in tasks:
            d, cls = _delta(r.get(f"{t}_delta"))
            num += [f'<td class="num">{_num(r.get(f"{t}_pretrained"))}</td>',
                    f'<td class="num">{_num(r.get(f"{t}_personalised"))}</td>',
                    f'<td class="num"><span class="delta {cls}">{d}</span></td>']
            mdc += [_num(r.get(f"{t}_pretrained")), _num(r.get(f"{t}_personalised")), d]
        tail = []
        if show_gain:
            d, cls = _delta(r.get("gain"))
            tail.append(f'<td class="num"><span class="delta {cls}">{d}</span></td>')
            mdc.append(d)
        if has_conf:
            c = r.get("mask_confidence")
            ok = c is not None and isinstance(c, (int, float)) and math.isfinite(c)
            low = ok and threshold is not None and c < threshold
            text = f"{c:.2f}" if ok else "–"
            boxes = int(r.get("mask_boxes") or 0)
            box = f" · {boxes} box" if boxes else ""  # photos where nothing was found: a centred box
            why = (f"below {threshold:g}: check the mask" if low else "") + (
                f"{'; ' if low else ''}{boxes} of the train photos got a centred box (nothing was found)" if boxes else "")
            tail.append(f'<td class="num{" lowconf" if low else ""}"'
                        + (f' title="{html.escape(why)}"' if why else "") + f">{text}{box}"
                        + (" ⚠" if low else "") + "</td>")
            mdc.append(text + box + (" ⚠" if low else ""))
        for c in extra:
            v = str(r.get(c) or "")
            v = "" if v == "nan" else v
            if c == "model_reason" and r["status"] != "ok":  # a failed instance: why it has no result
                v = failures.get(str(r["instance"]), str(r["status"]))
            tail.append(f"<td class=\"wrap\">{html.escape(v)}</td>")
            mdc.append(v)
        if has_note:
            note = "" if r["status"] == "ok" else failures.get(str(r["instance"]), str(r["status"]))
            tail.append(f'<td class="wrap">{html.escape(note)}</td>')
            mdc.append(note)
        cls = ' class="failed"' if r["status"] != "ok" else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in cells) + "".join(num) + "".join(tail) + "</tr>")
        md_rows.append(mdc)
    n_ok = int((table["status"] == "ok").sum())
    cap = (f"{n_ok} personalised model{'s' if n_ok != 1 else ''} × instance, best gain first"
           + (" (gain = mean Δ over the tasks)" if show_gain else "")
           + "; values x100; Δ = personalised minus pretrained"
           + ("; mask confidence = the lowest of the instance's automatic train masks"
              + (f", ⚠ below {threshold:g}" if threshold is not None else "") if has_conf else "")
           + (f"; model used for every instance: {same_model}" if same_model is not None else "")
           + (". Instances without a personalised result come last." if (table["status"] != "ok").any() else "."))
    h = ['<h2 id="per-instance">Per instance</h2>', f'<p class="cap">{html.escape(cap)}</p>',
         f'<div class="tw"><table class="inst-table"><thead><tr>{th1}</tr><tr>{th2}</tr></thead>'
         f'<tbody>{"".join(body)}</tbody></table></div>']
    md_head = left + [f"{t} {metric_name(t)} {w}" for t in tasks for w in ("pretrained", "personalised", "Δ")] + right
    return h, ["## Per instance", "", cap, "", md_table(md_head, md_rows), ""]


__all__ = ["failure_reasons", "instance_section", "md_table", "verdict_section", "warnings_section"]
