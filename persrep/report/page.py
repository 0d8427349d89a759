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
from persrep.report.notes import sort_notes
from persrep.report.sections import (HTML, MD, failure_reasons, instance_section, md_table, short_paths,
                                     verdict_section, warnings_section)
from persrep.report.tables import (HEADLINE, METRIC_NAME, _all_metrics, _headline_rows, _scenes,
                                   _skipped, _tasks, backbone_task_table, format_cell,
                                   generation_table, load_run, scene_table)
from persrep.report.verdict import instance_table, run_cost, title_words, verdicts
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


_md_table = md_table


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
.verdict{background:#fff;border-left:6px solid #1f3b63;padding:4px 20px 10px;margin:18px 0;
 box-shadow:0 1px 2px rgba(0,0,0,.08)}.verdict h2{border:0;margin:12px 0 4px}
.verdict .headline{font-size:21px;font-weight:600;margin:6px 0 10px;color:#1f3b63}
.verdict .lead{font-size:17px;font-weight:600;margin:8px 0 2px}.verdict ul{margin:4px 0 8px;font-size:16px}
.verdict li.pos-line::marker{color:#188038}.verdict li.neg-line::marker{color:#d93025}
h2.quiet{font-size:16px;border:0;margin:18px 0 4px;color:#5f6368}
details.fold{padding:8px 12px} details.fold>summary{font-weight:400}
table.inst-table th.grp{text-align:center;border-left:2px solid #dadce0}
td.lowconf{color:#d93025;font-weight:600} tr.failed td{color:#80868b}
table.inst-table{font-size:13px} table.inst-table th,table.inst-table td{padding:4px 7px}
td.wrap{white-space:normal;min-width:150px;max-width:280px;font-size:12px}
details.run{background:#fff;padding:8px 14px;box-shadow:0 1px 2px rgba(0,0,0,.08)}
details.run h3{font-size:15px;margin:14px 0 4px}
.tw{overflow-x:auto;max-width:100%}
code{background:#eef1f5;padding:1px 4px;border-radius:3px}
""" + GALLERY_CSS


def write_report(run_dir_or_results: Any, out_dir: str | Path, *, examples: Sequence[Any] | None = None,
                 summary: dict[str, Any] | None = None, title: str | None = None) -> Path:
    """Write ``report.html``, ``report.md`` and ``plots/*.png`` into ``out_dir``; return the HTML path.

    Order: the verdict and the headline table (the first screen), the warnings (repeated ones
    folded), the per-instance table, the plots and the sections the run can fill ((b) with more
    than one data configuration, (c) with scenes, (d) with more than one configuration), the
    galleries, and the run details folded at the end."""
    from persrep.redaction import redact_obj, redact_text

    run = load_run(run_dir_or_results)
    if summary:
        run.summary = {**run.summary, **summary}
    frame = run.frame
    out = Path(out_dir)
    plots_dir = out / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    s = run.summary
    title = title or title_words(s, frame)
    instances = sorted(str(i) for i in frame["instance"].dropna().unique())

    head_rows = _headline_rows(frame)
    tasks = _tasks(head_rows) if len(head_rows) else []
    one_backbone = frame["backbone"].nunique() <= 1
    auto = _auto_masks(run)
    table = instance_table(frame, auto.lowest() if auto else None, auto.boxes() if auto else None)
    groups, info_notes = sort_notes(list(s.get("notes") or []), instances)
    h: list[str] = []   # html body parts
    md: list[str] = [f"# {title}", ""]
    meta = _subtitle(run, frame, table)
    md += [" · ".join(meta), ""]

    bh, bmd = _banners(run)
    h += bh
    md += bmd

    # the verdict, then (a): the first screen
    sk = _skipped(frame)
    measured = set(head_rows["task"]) if len(head_rows) else set()
    not_measured = [t for t in dict.fromkeys(sk["task"]) if t not in measured] if not sk.empty else []
    vh, vmd = verdict_section(verdicts(frame), table, run_cost(s, len(instances)),
                              auto_masks=bool(auto) or bool((s.get("stages") or {}).get("auto_masks")),
                              not_measured=not_measured, instances=int(s.get("instances") or len(instances)),
                              one_backbone=one_backbone)
    h += vh
    md += vmd
    cap = ("Headline metric per task (classification AP = PR-AUC, retrieval NDCG, detection and "
           "segmentation mAP@[.5:.95]), x100, mean ± std over instances; coloured "
           "numbers: personalised minus pretrained, averaged over the instances both were measured on.")
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

    # warnings: one note per kind, repeated ones folded (mask thumbnails inside)
    def mask_thumbs(low: dict[str, list[int]]) -> str:
        from persrep.report.gallery import low_masks_html

        return low_masks_html(str(run.source), s, run.settings, out, low) if auto else ""
    wh, wmd = warnings_section(groups, lambda t: short_paths(redact_text(t)), mask_thumbs)
    if wh:
        h.append('<h2 class="quiet">Warnings</h2>')
        md += ["## Warnings", ""]
    h += wh
    md += wmd

    # per instance
    ih, imd = instance_section(table, threshold=auto.threshold if auto else None,
                               failures=failure_reasons(s, instances, lambda t: short_paths(redact_text(t))), one_backbone=one_backbone)
    h += ih
    md += imd

    p = plot_task_bars(frame, plots_dir / "tasks.png")
    if p:
        _add(h, md, p, "Headline metric per task: pretrained vs personalised, per backbone")

    for part in (_generation_section(frame, tasks, plots_dir), _scene_section(frame, plots_dir)):
        h += part[0]
        md += part[1]

    # (d) compute vs quality (with more than one configuration), then the per-instance galleries
    h_more, md_more = _compute_and_galleries(run, frame, out, plots_dir)
    h += h_more
    md += md_more

    # retrieval examples
    if examples:
        p = plot_retrieval_examples(examples, plots_dir / "retrieval_examples.png")
        if p:
            h.append("<h2>Retrieval examples</h2>")
            md += ["## Retrieval examples", ""]
            _add(h, md, p, "Queries and their top-ranked gallery images "
                           "(green = same instance, red = another instance)")

    # run details, folded: paths, notes, every metric, skipped tasks, stages, costs, settings
    dh, dmd = _run_details(run, frame, info_notes, sk, redact_obj, redact_text)
    h += dh
    md += dmd

    subtitle = html.escape(" · ".join(meta))
    doc = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"/>'
           f'<meta name="viewport" content="width=device-width, initial-scale=1"/>'
           f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
           f'<header><h1>{html.escape(title)}</h1><div class="meta">{subtitle}</div></header>'
           f"<main>{''.join(h)}</main></body></html>")
    (out / "report.html").write_text(doc, encoding="utf-8")
    (out / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    return out / "report.html"


def _add_table(h: HTML, md: MD, head: list[str], rows: list[list[Any]]) -> None:
    """Append a table in both formats (cells escaped for HTML)."""
    h.append(_html_table(head, [[html.escape(str(c)) for c in row] for row in rows]))
    md += [_md_table(head, rows), ""]


def _add(h: HTML, md: MD, path: Path, caption: str) -> None:
    """Append a plot: an image (HTML) and a Markdown image line."""
    h.append(_img_tag(path, caption))
    md.extend([f"![{caption}](plots/{path.name})", ""])


def _banners(run: Any) -> tuple[HTML, MD]:
    """Red banners above the verdict: in-pool negatives (leakage), adapters trained on a fallback."""
    h: HTML = []
    md: MD = []
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
    return h, md


def _generation_section(frame: pd.DataFrame, tasks: list[str], plots_dir: Path) -> tuple[HTML, MD]:
    """(b) generator x CFG x caption source, with the CFG curves."""
    h: HTML = []
    md: MD = []
    # only with more than one personalised data configuration on a backbone
    tb = generation_table(frame)
    if not tb.empty and _several_configs(tb):
        h.append("<h2>(b) Generator × CFG × caption source</h2>"
                 '<p class="cap">Personalised adapters per synthetic data configuration '
                 "(x100, mean ± std over instances); the pretrained row is the reference.</p>")
        md += ["## (b) Generator × CFG × caption source", ""]
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
        _add_table(h, md, head, rows)
        p = plot_cfg_curves(frame, plots_dir / "cfg_curves.png")
        if p:
            _add(h, md, p, "Headline metric vs classifier-free guidance scale (band = ± std)")
    return h, md


def _scene_section(frame: pd.DataFrame, plots_dir: Path) -> tuple[HTML, MD]:
    """(c) classification AP per test scene."""
    h: HTML = []
    md: MD = []
    # only when the data set has test scenes
    tc = scene_table(frame)
    if not tc.empty:
        h.append("<h2>(c) Classification AP per test scene</h2>")
        md += ["## (c) Classification AP per test scene", ""]
        scenes = _scenes(tc)
        head = ["backbone", "model"] + [sc.replace("_", " ") for sc in scenes]
        rows = [[r["backbone"], r["label"]] + [format_cell(r.get(f"{sc}_mean", np.nan),
                                                           r.get(f"{sc}_std", np.nan))
                                               for sc in scenes] for r in tc.to_dict("records")]
        h.append('<p class="cap">AP x100, mean ± std over instances; each scene\'s pool holds '
                 "that scene's test images of every instance.</p>")
        _add_table(h, md, head, rows)
        p = plot_scene_bars(frame, plots_dir / "scenes.png")
        if p:
            _add(h, md, p, "Classification AP per test scene")
    return h, md


def _several_configs(tb: pd.DataFrame) -> bool:
    """Whether some backbone has more than one personalised data configuration (else (b) and (d)
    would hold one point each)."""
    per = tb[tb["generator"] != "pretrained"]
    return bool(len(per)) and int(per.groupby("backbone")["data_config"].nunique().max()) > 1


def _auto_masks(run: Any) -> Any:
    from persrep.report.automasks import AutoMasks

    try:
        return AutoMasks(str(run.source), run.settings)
    except Exception:  # noqa: BLE001 - not a run directory (a bare table) or storage moved
        return None


def _subtitle(run: Any, frame: pd.DataFrame, table: pd.DataFrame) -> list[str]:
    """Short facts under the title: run, backbone(s), instances, date; never a machine path."""
    s = run.summary
    meta = []
    if s.get("run_id"):
        meta.append(f"run {s['run_id']}")
    bbs = sorted(set(frame["backbone"]) - {"-"})
    if bbs:
        meta.append(("backbone " if len(bbs) == 1 else "backbones ") + ", ".join(bbs))
    n = int(s.get("instances") or frame["instance"].nunique())
    if not table.empty:
        ok = table.loc[table["status"] == "ok", "instance"].nunique()
        meta.append(f"{ok} of {n} instances personalised")
    else:
        meta.append(f"{n} instances")
    src = str(run.source)
    if not src.startswith("s3://") and (Path(src) / "results.parquet").is_file():
        import datetime as _dt

        t = (Path(src) / "results.parquet").stat().st_mtime
        meta.append("finished " + _dt.datetime.fromtimestamp(t, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    return meta


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
        h.append(f'<p class="cap">compute vs quality not shown: {html.escape(redact_text(str(exc)))}</p>')
    if len(table) and int(table.groupby("backbone")["data_config"].nunique().max()) > 1:
        cap = ("Seconds per instance spent generating (generator prep + synthesis, from the units' "
               "recorded seconds) and training (personalisation) vs the gain over the pretrained "
               "backbone (x100, mean over instances).")
        h.append(f'<h2>(d) Compute vs quality per data configuration</h2><p class="cap">{cap}</p>')
        md += ["## (d) Compute vs quality per data configuration", "", cap, ""]
        gains = [c for c in table.columns if c.startswith("gain_")]
        head = ["backbone", "data config", "s generate", "s train"] + [c[5:] + " gain" for c in gains]
        rows = [[r["backbone"], r["data_config"], f"{r['seconds_generate']:.1f}", f"{r['seconds_train']:.1f}"]
                + [f"{r[c]:+.1f}" if np.isfinite(r[c]) else "–" for c in gains] for r in table.to_dict("records")]
        _add_table(h, md, head, rows)
        p = plot_compute_quality(table, plots_dir / "compute_quality.png")
        if p:
            caption = "Gain over pretrained vs seconds per instance, per data configuration"
            h.append(_img_tag(p, caption))
            md += [f"![{caption}](plots/{p.name})", ""]
    instances = sorted(frame["instance"].dropna().unique()) if "instance" in frame else []
    try:
        body, _ = gallery_html(src, run.summary, run.settings, out, [str(i) for i in instances],
                               _gallery_headlines(frame))
    except Exception as exc:  # noqa: BLE001 - data set or units moved: say so, keep the tables
        h.append(f'<p class="cap">galleries not shown: {html.escape(redact_text(str(exc)))}</p>')
        return h, md
    if body:
        h.append(f"<h2>Instances ({len(instances)})</h2><p class=\"cap\">Click an instance to see its "
                 "training photos, synthetic data, negatives, retrieval and dense predictions "
                 "(thumbnails in thumbs/, loaded when opened).</p>" + body)
        md += ["## Instances", "", f"Image galleries for {len(instances)} instances: see report.html.", ""]
    return h, md


def _gallery_headlines(frame: pd.DataFrame) -> dict[str, str]:
    """instance -> its differences per task (its best personalised model), for the gallery titles."""
    from persrep.report.verdict import metric_name

    table = instance_table(frame)
    out: dict[str, str] = {}
    if table.empty:
        return out
    tasks = [c[:-len("_delta")] for c in table.columns if c.endswith("_delta")]
    for r in table.to_dict("records"):
        name = str(r["instance"])
        if name in out:
            continue  # sorted by gain: the first row is the best model
        if r["status"] != "ok":
            out[name] = "no personalised result"
            continue
        out[name] = " · ".join(f"{metric_name(t)} {_delta_text(r[f'{t}_delta'])}" for t in tasks
                               if math.isfinite(r[f"{t}_delta"]))
    return out


def _read_text(src: str, name: str) -> bytes | None:
    from persrep.report.tables import _read

    try:
        return _read(src, name)
    except Exception:  # noqa: BLE001
        return None


def _run_details(run: Any, frame: pd.DataFrame, info_notes: list[str], sk: pd.DataFrame,
                 redact_obj, redact_text) -> tuple[list[str], list[str]]:
    """The folded run details at the end: where the run and data live, informational notes,
    failures, stages and their costs, skipped tasks, every metric and the settings."""
    s = run.summary
    parts: list[str] = []
    md: list[str] = ["## Run details", ""]
    facts = [("run id", s.get("run_id")), ("run directory", None if str(run.source) == "results" else run.source),
             ("data set", s.get("data")), ("settings", s.get("config")), ("instances", s.get("instances"))]
    rows = [[html.escape(k), html.escape(redact_text(str(v)))] for k, v in facts if v is not None]
    if rows:
        parts.append(_html_table(["", ""], rows))
        md += [_md_table(["", ""], [[k, redact_text(str(v))] for k, v in facts if v is not None]), ""]
    if info_notes:
        parts.append("<h3>Notes</h3><ul>" + "".join(f"<li>{html.escape(redact_text(n))}</li>" for n in info_notes)
                     + "</ul>")
        md += ["Notes:", ""] + [f"- {redact_text(n)}" for n in info_notes] + [""]
    for f in s.get("failures") or []:
        text = redact_text(json.dumps(f, default=str))
        parts.append(f'<div class="note">failed: {html.escape(text)}</div>')
        md.append(f"- failed: {text}")
    stages = s.get("stages") or s.get("counts") or {}
    if stages:
        cols = sorted({k for v in stages.values() for k in v})
        parts.append("<h3>Stages</h3>" + _html_table(["stage"] + cols, [[html.escape(st)] + [str(v.get(c, 0)) for c in cols]
                                                     for st, v in stages.items()]))
        md += ["", _md_table(["stage"] + cols, [[st] + [str(v.get(c, 0)) for c in cols]
                                                for st, v in stages.items()]), ""]
    timings = s.get("timings") or {}
    if timings:
        t_rows = [[k, f"{float(v):.1f}"] for k, v in timings.items()]
        parts.append("<h3>Wall seconds per stage</h3>" + _html_table(["stage", "seconds"], [[html.escape(a), b]
                                                                   for a, b in t_rows]))
        md += [_md_table(["stage", "seconds"], t_rows), ""]
    costs = s.get("costs") or {}
    c_rows = [[st, ut, str(c.get("units_run", 0)), str(c.get("skipped", 0)), str(c.get("failed", 0)),
               f"{float(c.get('seconds_sum') or 0):.1f}", f"{float(c.get('seconds_max') or 0):.1f}",
               "–" if c.get("peak_rss_max_gb") is None else f"{c['peak_rss_max_gb']:.2f}"]
              for st, v in costs.items() for ut, c in (v.get("unit_types") or {}).items()]
    if c_rows:
        head = ["stage", "unit type", "run", "reused", "failed", "unit seconds (sum)", "max", "peak GiB"]
        parts.append("<h3>Units and their cost</h3>" + _html_table(head, [[html.escape(c) for c in r] for r in c_rows]))
        md += [_md_table(head, c_rows), ""]
    if not sk.empty:
        head = ["backbone", "model", "task", "reason", "instances"]
        rows_ = [[r.backbone, r.label, r.task, redact_text(str(r.reason)), str(r.instances)]
                 for r in sk.itertuples()]
        parts.append("<h3>Skipped tasks</h3>" + _html_table(head, [[html.escape(c) for c in row] for row in rows_], "skipped"))
        md += ["Skipped tasks:", "", _md_table(head, rows_), ""]
    am = _all_metrics(frame)
    if not am.empty:
        head = ["backbone", "task", "metric", "model", "mean ± std (x100)", "n"]
        rows_ = [[r.backbone, str(r.task), r.metric, r.label, format_cell(r.mean, r.std), str(r.n)]
                 for r in am.itertuples()]
        parts.append("<h3>All metrics</h3>" + _html_table(head, [[html.escape(c) for c in row] for row in rows_]))
        md += ["All metrics:", "", _md_table(head, rows_), ""]
    if run.settings:
        from persrep.config import flatten

        flat = flatten(redact_obj(run.settings))
        rows_ = [[html.escape(k), html.escape(str(v))] for k, v in flat.items()]
        parts.append("<h3>Settings</h3>" + _html_table(["key", "value"], rows_))
    h = ['<h2 id="run-details">Run details</h2><details class="run"><summary>Where the run and its data '
         "are, notes, failures, stages and their cost, skipped tasks, every metric, settings</summary>"
         + "".join(parts) + "</details>"]
    return h, md


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

