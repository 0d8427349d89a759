"""Rendering the report: HTML (self-contained, plots embedded) and Markdown."""

from __future__ import annotations

import base64
import html
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from persrep.report.gallery import GALLERY_CSS
from persrep.report.plots import (plot_cfg_curves, plot_retrieval_examples, plot_scene_bars,
                                  plot_task_bars)
from persrep.report.tables import (HEADLINE, METRIC_NAME, _all_metrics, _headline_rows, _scenes,
                                   _skipped, _tasks, backbone_task_table, format_cell,
                                   generation_table, load_run, scene_table)
LEAKAGE_TEXT = (
    "Negatives were drawn from other instances of the evaluated data set "
    "(personalization.negatives=in_pool). Those objects are the very ones that fill the "
    "classification pool, which a real user never has, so classification gains here are inflated "
    "by closed-set leakage. Measured on a real product set: in-pool negatives gave AP +15 / "
    "NDCG +7, negatives from outside the pool AP -1 / NDCG +11. Read the classification numbers "
    "as an upper bound; rerun with personalization.negatives=generated or external for a fair result.")


# ---------------------------------------------------------------------------------------------
# rendering
def _cfg_text(v: Any) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return "–" if not math.isfinite(f) else f"{f:g}"


def _delta_text(d: float) -> str:
    r = round(100 * d, 1)
    return "±0.0" if r == 0 else f"{r:+.1f}"


def _delta_html(d: float) -> str:
    if not math.isfinite(d):
        return ""
    r = round(100 * d, 1)
    return f' <span class="delta {"pos" if r > 0 else "neg" if r < 0 else "zero"}">{_delta_text(d)}</span>'


def _table_a(t: pd.DataFrame, tasks: list[str]) -> tuple[list[str], list[list[str]], list[list[str]]]:
    head = ["backbone", "model"] + [f"{t_} ({METRIC_NAME.get(HEADLINE.get(t_, ''), '')})" for t_ in tasks]
    html_rows, md_rows = [], []
    for r in t.to_dict("records"):
        cells = [format_cell(r[f"{t_}_mean"], r[f"{t_}_std"]) for t_ in tasks]
        html_rows.append([html.escape(r["backbone"]), html.escape(r["label"])] + [
            f'<span title="n={r[f"{t_}_n"]}">{html.escape(c)}</span>{_delta_html(r[f"{t_}_delta"])}'
            for c, t_ in zip(cells, tasks)])
        md_rows.append([r["backbone"], r["label"]] + [
            c + (f" ({_delta_text(r[f'{t_}_delta'])})" if math.isfinite(r[f"{t_}_delta"]) else "")
            for c, t_ in zip(cells, tasks)])
    return head, html_rows, md_rows


_NUMERIC = re.compile(r"^(<span[^>]*>)?([–+\-]?\d[\d.]*( ± [\d.]+)?|–)(<|$)")


def _html_table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    first = rows[0] if rows else []
    th = "".join(f'<th class="num">{h}</th>' if i < len(first) and _NUMERIC.match(str(first[i]))
                 else f"<th>{h}</th>" for i, h in enumerate(head))
    body = "".join("<tr>" + "".join(
        f'<td class="num">{c}</td>' if _NUMERIC.match(str(c)) else f"<td>{c}</td>" for c in row)
        + "</tr>" for row in rows)
    return (f'<div class="tw"><table class="{cls}"><thead><tr>{th}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    esc = [[str(c).replace("|", "\\|") for c in row] for row in rows]
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] +
                     ["| " + " | ".join(r) + " |" for r in esc])


def _img_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"/>' \
           f"<figcaption>{html.escape(alt)}</figcaption></figure>"


CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;margin:0;
 background:#f6f7f9;color:#202124;font-size:15px;line-height:1.45}
main{max-width:1180px;margin:0 auto;padding:24px 32px 48px}
header{background:#1f3b63;color:#fff;padding:22px 32px}
header h1{margin:0 0 4px;font-size:26px} header .meta{opacity:.85;font-size:14px}
h2{margin:30px 0 8px;font-size:20px;border-bottom:2px solid #dadce0;padding-bottom:4px}
p.cap{color:#5f6368;font-size:13px;margin:2px 0 10px}
table{border-collapse:collapse;background:#fff;margin:6px 0 14px;font-size:14px;
 box-shadow:0 1px 2px rgba(0,0,0,.08)}
th,td{padding:6px 10px;border-bottom:1px solid #e8eaed;text-align:left;white-space:nowrap}
th{background:#eef1f5;font-weight:600} th.num,td.num{text-align:right;font-variant-numeric:tabular-nums}
tbody tr:nth-child(even){background:#fafbfc}
.delta{font-size:12px;font-weight:600;margin-left:4px}.pos{color:#188038}.neg{color:#d93025}
.zero{color:#5f6368}
.leak{background:#fce8e6;border:3px solid #d93025;color:#a50e0e;padding:14px 18px;
 border-radius:6px;margin:18px 0;font-size:15px}.leak strong{font-size:18px;display:block;margin-bottom:4px}
.note{background:#fff8e1;border-left:4px solid #f9ab00;padding:8px 12px;margin:8px 0;font-size:14px}
figure{margin:12px 0 20px;background:#fff;padding:10px;box-shadow:0 1px 2px rgba(0,0,0,.08)}
figure img{max-width:100%} figcaption{color:#5f6368;font-size:13px}
details{margin:8px 0} summary{cursor:pointer;font-weight:600}
.tw{overflow-x:auto;max-width:100%}
code{background:#eef1f5;padding:1px 4px;border-radius:3px}
""" + GALLERY_CSS


def write_report(run_dir_or_results: Any, out_dir: str | Path, *, examples: Sequence[Any] | None = None,
                 summary: dict[str, Any] | None = None, title: str | None = None) -> Path:
    """Write ``report.html``, ``report.md`` and ``plots/*.png`` into ``out_dir``; return the HTML path."""
    from persrep.redaction import redact_obj, redact_text

    run = load_run(run_dir_or_results)
    if summary:
        run.summary = {**run.summary, **summary}
    frame = run.frame
    out = Path(out_dir)
    plots_dir = out / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    s = run.summary
    title = title or f"persrep report: {s.get('run_id') or Path(run.source).name or 'results'}"

    head_rows = _headline_rows(frame)
    tasks = _tasks(head_rows) if len(head_rows) else []
    h: list[str] = []   # html body parts
    md: list[str] = [f"# {title}", ""]
    meta = [f"{k}: {s[k]}" for k in ("config", "data") if s.get(k) is not None]
    meta.append(f"{frame['instance'].nunique()} instances, {frame['backbone'].nunique()} backbone(s), "
                f"{len(frame)} result rows")
    md += [" · ".join(redact_text(str(m)) for m in meta), ""]

    if run.leakage:
        h.append(f'<div class="leak"><strong>⚠ Leakage warning: in-pool negatives</strong>'
                 f"{html.escape(LEAKAGE_TEXT)}</div>")
        md += [f"> **⚠ LEAKAGE WARNING: in-pool negatives.** {LEAKAGE_TEXT}", ""]
    fb = run.fallbacks
    if len(fb):
        names = ", ".join(f"{r.data_config}:{r.instance}" for r in fb.head(12).itertuples())
        text = (f"{len(fb)} adapter(s) were trained on the instance's real photos, not on the synthetic "
                f"positives their data configuration names: their filter kept too few images "
                f"(synthesis.filter.on_empty=real_only). Rows labelled positives=real_only_fallback: {names}"
                + (" ..." if len(fb) > 12 else ""))
        h.append(f'<div class="leak"><strong>⚠ Fallback: not trained on what the label says</strong>'
                 f"{html.escape(text)}</div>")
        md += [f"> **⚠ FALLBACK.** {text}", ""]
    for note in s.get("notes") or []:
        h.append(f'<div class="note">{html.escape(redact_text(str(note)))}</div>')
        md += [f"> {redact_text(str(note))}", ""]

    # (a)
    cap = ("Headline metric per task (classification AP = PR-AUC, retrieval NDCG, detection and "
           "segmentation mAP@[.5:.95]), scene 'all', x100, mean ± std over instances; coloured "
           "numbers are personalised minus pretrained.")
    h.append("<h2>(a) Pretrained vs personalised, per backbone and task</h2>"
             f'<p class="cap">{cap}</p>')
    md += ["## (a) Pretrained vs personalised, per backbone and task", "", cap, ""]
    ta = backbone_task_table(frame)
    if ta.empty:
        h.append("<p>No successful results.</p>")
        md += ["No successful results.", ""]
    else:
        head, hr, mr = _table_a(ta, tasks)
        h.append(_html_table(head, hr, "main"))
        md += [_md_table(head, mr), ""]

    def add_plot(path: Path, caption: str) -> None:
        h.append(_img_tag(path, caption))
        md.extend([f"![{caption}](plots/{path.name})", ""])

    p = plot_task_bars(frame, plots_dir / "tasks.png")
    if p:
        add_plot(p, "Headline metric per task: pretrained vs personalised, per backbone")

    # (b)
    h.append("<h2>(b) Generator × CFG × caption source</h2>"
             '<p class="cap">Personalised adapters per synthetic data configuration '
             "(x100, mean ± std over instances); the pretrained row is the reference.</p>")
    md += ["## (b) Generator × CFG × caption source", ""]
    tb = generation_table(frame)
    if tb.empty:
        h.append("<p>No successful results.</p>")
        md += ["No successful results.", ""]
    else:
        extra = [c for c in tb.columns if c in ("global_feature", "negatives_source")]
        # the data config name is shown only where generator x CFG x captions does not determine it
        show_dc = tb.groupby(["backbone", "generator", "cfg", "caption_source"] + extra,
                             dropna=False)["data_config"].nunique().max() > 1
        head = ["backbone", "generator", "CFG", "captions"] + (["data config"] if show_dc else []) + extra + [
            f"{t} ({METRIC_NAME.get(HEADLINE.get(t, ''), '')})" for t in tasks]
        rows = []
        for r in tb.to_dict("records"):
            rows.append([r["backbone"], r["generator"], _cfg_text(r["cfg"]), r["caption_source"]]
                        + ([r["data_config"]] if show_dc else []) + [str(r[c]) for c in extra] + [
                format_cell(r.get(f"{t}_mean", np.nan), r.get(f"{t}_std", np.nan)) for t in tasks])
        h.append(_html_table(head, [[html.escape(str(c)) for c in row] for row in rows]))
        md += [_md_table(head, rows), ""]
    p = plot_cfg_curves(frame, plots_dir / "cfg_curves.png")
    if p:
        add_plot(p, "Headline metric vs classifier-free guidance scale (band = ± std)")

    # (c)
    h.append("<h2>(c) Classification AP per test scene</h2>")
    md += ["## (c) Classification AP per test scene", ""]
    tc = scene_table(frame)
    if tc.empty:
        h.append("<p>No per-scene classification results (the data set has no scenes).</p>")
        md += ["No per-scene classification results (the data set has no scenes).", ""]
    else:
        scenes = _scenes(tc)
        head = ["backbone", "model"] + [sc.replace("_", " ") for sc in scenes]
        rows = [[r["backbone"], r["label"]] + [format_cell(r.get(f"{sc}_mean", np.nan),
                                                           r.get(f"{sc}_std", np.nan))
                                               for sc in scenes] for r in tc.to_dict("records")]
        h.append('<p class="cap">AP x100, mean ± std over instances; each scene\'s pool holds '
                 "that scene's test images of every instance.</p>")
        h.append(_html_table(head, [[html.escape(str(c)) for c in row] for row in rows]))
        md += [_md_table(head, rows), ""]
        p = plot_scene_bars(frame, plots_dir / "scenes.png")
        if p:
            add_plot(p, "Classification AP per test scene")

    # (d) compute vs quality, then the per-instance galleries (need the run's units.json)
    h_more, md_more = _compute_and_galleries(run, frame, out, plots_dir)
    h += h_more
    md += md_more

    # retrieval examples
    if examples:
        p = plot_retrieval_examples(examples, plots_dir / "retrieval_examples.png")
        if p:
            h.append("<h2>Retrieval examples</h2>")
            md += ["## Retrieval examples", ""]
            add_plot(p, "Queries and their top-ranked gallery images "
                             "(green = same instance, red = another instance)")

    # all metrics, skipped, run details
    am = _all_metrics(frame)
    if not am.empty:
        head = ["backbone", "task", "metric", "model", "mean ± std (x100)", "n"]
        rows = [[r.backbone, str(r.task), r.metric, r.label, format_cell(r.mean, r.std), str(r.n)]
                for r in am.itertuples()]
        h.append("<h2>All metrics (scene 'all')</h2><details><summary>"
                 f"{len(rows)} rows</summary>"
                 + _html_table(head, [[html.escape(c) for c in row] for row in rows]) + "</details>")
        md += ["## All metrics (scene 'all')", "", _md_table(head, rows), ""]
    sk = _skipped(frame)
    h.append("<h2>Skipped tasks</h2>")
    md += ["## Skipped tasks", ""]
    if sk.empty:
        h.append("<p>None: every requested task ran.</p>")
        md += ["None: every requested task ran.", ""]
    else:
        head = ["backbone", "model", "task", "reason", "instances"]
        rows = [[r.backbone, r.label, r.task, redact_text(str(r.reason)), str(r.instances)]
                for r in sk.itertuples()]
        h.append(_html_table(head, [[html.escape(c) for c in row] for row in rows], "skipped"))
        md += [_md_table(head, rows), ""]
    h.append(_run_details_html(s, run.settings, redact_obj, redact_text))
    md += _run_details_md(s, redact_text)

    subtitle = html.escape(" · ".join(redact_text(str(m)) for m in meta))
    doc = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"/>'
           f'<meta name="viewport" content="width=device-width, initial-scale=1"/>'
           f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
           f'<header><h1>{html.escape(title)}</h1><div class="meta">{subtitle}</div></header>'
           f"<main>{''.join(h)}</main></body></html>")
    (out / "report.html").write_text(doc, encoding="utf-8")
    (out / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    return out / "report.html"


def _compute_and_galleries(run: Any, frame: pd.DataFrame, out: Path,
                           plots_dir: Path) -> tuple[list[str], list[str]]:
    """Section (d) and the galleries; a run without ``units.json`` (older runs, a bare
    results table) gets neither, and a note says why."""
    from persrep.redaction import redact_text
    from persrep.report.compute import compute_frame, plot_compute_quality
    from persrep.report.gallery import gallery_html, run_root

    src = str(run.source)
    raw = _read_text(src, "units.json")
    if raw is None:
        return [], []
    h: list[str] = []
    md: list[str] = []
    units = json.loads(raw)
    try:
        from persrep.storage import Storage

        storage = Storage(run_root(src), ((run.settings or {}).get("storage") or {}).get("s3_endpoint"))
        table = compute_frame(units, storage, frame)
    except Exception as exc:  # noqa: BLE001 - the storage moved: the rest of the report stands
        table = pd.DataFrame()
        h.append(f'<div class="note">compute vs quality not shown: {html.escape(redact_text(str(exc)))}</div>')
    if not table.empty:
        cap = ("Seconds per instance spent generating (generator prep + synthesis, from the units' "
               "recorded seconds) and training (personalisation) vs the gain over the pretrained "
               "backbone (x100, mean over instances).")
        h.append(f'<h2>(d) Compute vs quality per data configuration</h2><p class="cap">{cap}</p>')
        md += ["## (d) Compute vs quality per data configuration", "", cap, ""]
        gains = [c for c in table.columns if c.startswith("gain_")]
        head = ["backbone", "data config", "s generate", "s train"] + [c[5:] + " gain" for c in gains]
        rows = [[r["backbone"], r["data_config"], f"{r['seconds_generate']:.1f}", f"{r['seconds_train']:.1f}"]
                + [f"{r[c]:+.1f}" if np.isfinite(r[c]) else "–" for c in gains] for r in table.to_dict("records")]
        h.append(_html_table(head, [[html.escape(c) for c in row] for row in rows]))
        md += [_md_table(head, rows), ""]
        p = plot_compute_quality(table, plots_dir / "compute_quality.png")
        if p:
            caption = "Gain over pretrained vs seconds per instance, per data configuration"
            h.append(_img_tag(p, caption))
            md += [f"![{caption}](plots/{p.name})", ""]
    instances = sorted(frame["instance"].dropna().unique()) if "instance" in frame else []
    try:
        body, _ = gallery_html(src, run.summary, run.settings, out, [str(i) for i in instances])
    except Exception as exc:  # noqa: BLE001 - data set or units moved: say so, keep the tables
        h.append(f'<div class="note">galleries not shown: {html.escape(redact_text(str(exc)))}</div>')
        return h, md
    if body:
        h.append(f"<h2>Instances ({len(instances)})</h2><p class=\"cap\">Click an instance to see its "
                 "training photos, synthetic data, negatives, retrieval and dense predictions "
                 "(thumbnails in thumbs/, loaded when opened).</p>" + body)
        md += ["## Instances", "", f"Image galleries for {len(instances)} instances: see report.html.", ""]
    return h, md


def _read_text(src: str, name: str) -> bytes | None:
    from persrep.report.tables import _read

    try:
        return _read(src, name)
    except Exception:  # noqa: BLE001
        return None


def _run_details_html(s: dict[str, Any], settings: dict[str, Any] | None, redact_obj, redact_text) -> str:
    parts = ["<h2>Run</h2>"]
    stages = s.get("stages") or s.get("counts") or {}
    if stages:
        cols = sorted({k for v in stages.values() for k in v})
        rows = [[html.escape(st)] + [str(v.get(c, 0)) for c in cols] for st, v in stages.items()]
        parts.append(_html_table(["stage"] + cols, rows))
    timings = s.get("timings") or {}
    if timings:
        parts.append(_html_table(["stage", "seconds"], [[html.escape(k), f"{float(v):.1f}"]
                                                      for k, v in timings.items()]))
    for f in s.get("failures") or []:
        text = html.escape(redact_text(json.dumps(f, default=str)))
        parts.append(f'<div class="note">failed: {text}</div>')
    if settings:
        from persrep.config import flatten

        flat = flatten(redact_obj(settings))
        rows = [[html.escape(k), html.escape(str(v))] for k, v in flat.items()]
        parts.append("<details><summary>Settings</summary>" + _html_table(["key", "value"], rows)
                     + "</details>")
    return "".join(parts)


def _run_details_md(s: dict[str, Any], redact_text) -> list[str]:
    md = []
    stages = s.get("stages") or s.get("counts") or {}
    if stages:
        cols = sorted({k for v in stages.values() for k in v})
        md += ["## Run", "", _md_table(["stage"] + cols, [[st] + [str(v.get(c, 0)) for c in cols]
                                                          for st, v in stages.items()]), ""]
    timings = s.get("timings") or {}
    if timings:
        md += [_md_table(["stage", "seconds"], [[k, f"{float(v):.1f}"] for k, v in timings.items()]), ""]
    for f in s.get("failures") or []:
        md += [f"- failed: {redact_text(json.dumps(f, default=str))}"]
    return md


def main_report(run_dir: str | Path, out: str | Path | None = None,
                examples: Sequence[Any] | None = None) -> Path:
    """``persrep report RUN [--out DIR]``: write the report (default ``RUN/report/``) and print where."""
    src = str(run_dir)
    if out is None:
        out = (Path.cwd() / f"report-{src.rstrip('/').rsplit('/', 1)[-1]}" if src.startswith("s3://")
               else Path(src) / "report")
    path = write_report(src, out, examples=examples)
    print(f"report: {path} (and {path.with_suffix('.md').name}, plots/)")
    return path

