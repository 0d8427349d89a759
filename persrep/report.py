"""The run report: paper-style tables and plots from a run's tidy results (HTML + Markdown).

``write_report(run_dir_or_results, out_dir)`` reads ``results.parquet`` (+ ``summary.json`` and
``settings.yaml`` when present) from a run directory (local or ``s3://``), a parquet path or a
DataFrame, and writes ``report.html`` (self-contained: plots embedded as base64 PNG), ``report.md``
and ``plots/*.png`` next to them. Tables (values x100, mean +- sample std over instances):

(a) backbone x task, pretrained vs personalised, the headline metric per task (classification AP,
    retrieval NDCG, detection / segmentation mAP@[.5:.95]); (b) generator x CFG x caption source;
    (c) classification AP per test scene; then every metric, skipped tasks with their reasons,
    stage counts, timings and the (redacted) settings.

Plots (matplotlib, Agg canvas, no pyplot state): bars per task, CFG curves (when >1 CFG), per-scene
bars, and a retrieval example grid from ``examples`` = [(query, [top-k gallery], [relevant]), ...]
(PIL images or paths). A run with in-pool negatives gets a leakage warning at the top.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["HEADLINE", "write_report", "main_report", "load_run", "RunData",
           "backbone_task_table", "generation_table", "scene_table", "format_cell"]

HEADLINE = {"classification": "ap", "retrieval": "ndcg", "detection": "map", "segmentation": "map"}
TASKS = ["classification", "retrieval", "detection", "segmentation"]
METRIC_NAME = {"ap": "AP", "ndcg": "NDCG", "map": "mAP"}
SCENES = ["in_distribution", "pose", "distractors", "pose_and_distractors"]
DEFAULTS = {"backbone": "-", "model": "personalised", "data_config": "-", "generator": "-",
            "cfg": float("nan"), "caption_source": "-", "global_feature": "-",
            "negatives_source": "-"}
LEAKAGE_TEXT = (
    "Negatives were drawn from other instances of the evaluated data set "
    "(personalization.negatives=in_pool). Those objects are the very ones that fill the "
    "classification pool, which a real user never has, so classification gains here are inflated "
    "by closed-set leakage. Measured on a real product set: in-pool negatives gave AP +15 / "
    "NDCG +7, negatives from outside the pool AP -1 / NDCG +11. Read the classification numbers "
    "as an upper bound; rerun with personalization.negatives=generated or external for a fair result.")
PRETRAINED_COLOR = "#9aa0a6"
PALETTE = ["#1a73e8", "#e8710a", "#188038", "#a142f4", "#d93025", "#12b5cb", "#f9ab00", "#5f6368"]


# ---------------------------------------------------------------------------------------------
# loading
@dataclass
class RunData:
    frame: pd.DataFrame
    summary: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] | None = None
    source: str = "results"

    @property
    def leakage(self) -> bool:
        return bool(self.summary.get("leakage_warning")) or (
            "negatives_source" in self.frame and (self.frame["negatives_source"] == "in_pool").any())


def _read(run_dir: str, name: str) -> bytes | None:
    if run_dir.startswith("s3://"):
        from persrep.storage import Storage, StorageError

        try:
            return Storage(run_dir).read_bytes(name)
        except StorageError:
            if name == "results.parquet":
                raise
            return None
    p = Path(run_dir) / name
    return p.read_bytes() if p.is_file() else None


def load_run(run_dir_or_results: Any) -> RunData:
    """A run directory (local or s3://), a results parquet path, a DataFrame or a RunData."""
    if isinstance(run_dir_or_results, RunData):
        return run_dir_or_results
    if isinstance(run_dir_or_results, pd.DataFrame):
        return RunData(_normalise(run_dir_or_results))
    src = str(run_dir_or_results).rstrip("/")
    if src.endswith(".parquet"):
        frame = pd.read_parquet(src)
        src = src.rsplit("/", 1)[0] if "/" in src else "."
    else:
        data = _read(src, "results.parquet")
        if data is None:
            raise FileNotFoundError(f"{src}: no results.parquet (give a finished run directory, "
                                    "e.g. <storage root>/runs/<run id>)")
        frame = pd.read_parquet(io.BytesIO(data))
    summary = json.loads(_read(src, "summary.json") or b"{}")
    settings = None
    raw = _read(src, "settings.yaml")
    if raw:
        import yaml

        settings = yaml.safe_load(raw)
    elif isinstance(summary.get("settings"), dict):
        settings = summary["settings"]
    return RunData(_normalise(frame), summary, settings, src)


def _normalise(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    for col, default in DEFAULTS.items():
        if col not in frame:
            frame[col] = default
    frame["value"] = frame["value"].astype(float)
    frame["cfg"] = pd.to_numeric(frame["cfg"], errors="coerce")
    return frame


# ---------------------------------------------------------------------------------------------
# tables
def format_cell(mean: float, std: float = float("nan")) -> str:
    """``42.9 ± 3.1`` (x100); the std is left out when undefined (a single instance)."""
    if mean is None or not math.isfinite(mean):
        return "–"
    if std is None or not math.isfinite(std):
        return f"{100 * mean:.1f}"
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def _headline_rows(frame: pd.DataFrame, scene: str | None = "all") -> pd.DataFrame:
    ok = frame[frame["status"] == "ok"]
    if scene is not None:
        ok = ok[ok["scene"] == scene]
    return ok[[HEADLINE.get(t) == m for t, m in zip(ok["task"], ok["metric"])]]


def _variant_columns(frame: pd.DataFrame) -> list[str]:
    per = frame[frame["model"] != "pretrained"]
    return [c for c in ("global_feature", "negatives_source")
            if c in per and per[c].nunique(dropna=False) > 1]


def _label_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Add ``label``: 'pretrained' or the personalised data configuration (+ varying keys)."""
    frame = frame.copy()
    extra = _variant_columns(frame)

    def label(row: pd.Series) -> str:
        if row["model"] == "pretrained":
            return "pretrained"
        parts = [str(row["data_config"])] + [f"{c.split('_')[0]}={row[c]}" for c in extra]
        return "personalised · " + " · ".join(parts)
    frame["label"] = frame.apply(label, axis=1) if len(frame) else pd.Series(dtype=str)
    return frame


def _tasks(frame: pd.DataFrame) -> list[str]:
    present = set(frame["task"])
    return [t for t in TASKS if t in present] + sorted(present - set(TASKS))


def _stats(frame: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    g = frame.groupby(by, dropna=False, sort=True)["value"]
    return g.agg(mean="mean", std="std", n="count").reset_index()


def _order_labels(labels: Sequence[str]) -> list[str]:
    return sorted(set(labels), key=lambda s: (s != "pretrained", s))


def backbone_task_table(frame: pd.DataFrame) -> pd.DataFrame:
    """(a) rows (backbone, label), columns per task: mean/std/n/delta of the headline metric."""
    rows = _label_frame(_headline_rows(frame))
    tasks = _tasks(rows) if len(rows) else []
    if rows.empty:
        return pd.DataFrame(columns=["backbone", "label"])
    st = _stats(rows, ["backbone", "label", "task"])
    out = []
    for bb in sorted(st["backbone"].unique()):
        sub = st[st["backbone"] == bb]
        pre = {r.task: r.mean for r in sub[sub["label"] == "pretrained"].itertuples()}
        for lab in _order_labels(sub["label"]):
            rec: dict[str, Any] = {"backbone": bb, "label": lab}
            for t in tasks:
                r = sub[(sub["label"] == lab) & (sub["task"] == t)]
                m = float(r["mean"].iloc[0]) if len(r) else float("nan")
                rec[f"{t}_mean"] = m
                rec[f"{t}_std"] = float(r["std"].iloc[0]) if len(r) else float("nan")
                rec[f"{t}_n"] = int(r["n"].iloc[0]) if len(r) else 0
                rec[f"{t}_delta"] = (m - pre[t]) if lab != "pretrained" and t in pre else float("nan")
            out.append(rec)
    return pd.DataFrame(out)


def generation_table(frame: pd.DataFrame) -> pd.DataFrame:
    """(b) rows (backbone, generator, cfg, caption source, data config), headline per task."""
    rows = _headline_rows(frame)
    if rows.empty:
        return pd.DataFrame()
    keys = ["backbone", "generator", "cfg", "caption_source", "data_config"] + _variant_columns(rows)
    rows = rows.assign(generator=np.where(rows["model"] == "pretrained", "pretrained", rows["generator"]))
    out = []
    for key, grp in rows.groupby(keys, dropna=False, sort=False):
        rec: dict[str, Any] = dict(zip(keys, key))
        for task, g in grp.groupby("task"):
            v = g["value"]
            rec[f"{task}_mean"], rec[f"{task}_std"], rec[f"{task}_n"] = v.mean(), v.std(), v.count()
        out.append(rec)
    wide = pd.DataFrame(out)
    wide["_pre"] = wide["generator"] != "pretrained"
    return wide.sort_values(["backbone", "_pre", "generator", "cfg", "caption_source", "data_config"],
                            na_position="first").drop(columns="_pre").reset_index(drop=True)


def scene_table(frame: pd.DataFrame, task: str = "classification") -> pd.DataFrame:
    """(c) classification AP per test scene: rows (backbone, label), columns per scene."""
    rows = _headline_rows(frame, scene=None)
    rows = _label_frame(rows[rows["task"] == task])
    if rows.empty or set(rows["scene"]) <= {"all"}:
        return pd.DataFrame()
    st = _stats(rows, ["backbone", "label", "scene"])
    out = []
    for (bb, lab), sub in st.groupby(["backbone", "label"], sort=True):
        rec: dict[str, Any] = {"backbone": bb, "label": lab}
        for r in sub.itertuples():
            rec[f"{r.scene}_mean"], rec[f"{r.scene}_std"], rec[f"{r.scene}_n"] = r.mean, r.std, r.n
        out.append(rec)
    df = pd.DataFrame(out)
    return df.sort_values(["backbone", "label"], key=lambda s: s.map(
        lambda v: (v != "pretrained", v)) if s.name == "label" else s).reset_index(drop=True)


def _scenes(frame: pd.DataFrame) -> list[str]:
    present = {c[:-5] for c in frame.columns if c.endswith("_mean")}
    return [s for s in SCENES if s in present] + sorted(present - set(SCENES) - {"all"}) + (
        ["all"] if "all" in present else [])


def _all_metrics(frame: pd.DataFrame) -> pd.DataFrame:
    ok = _label_frame(frame[(frame["status"] == "ok") & (frame["scene"] == "all")])
    if ok.empty:
        return pd.DataFrame()
    st = _stats(ok, ["backbone", "label", "task", "metric"])
    st["task"] = pd.Categorical(st["task"], [t for t in TASKS if t in set(st["task"])] +
                                sorted(set(st["task"]) - set(TASKS)))
    return st.sort_values(["backbone", "task", "metric", "label"]).reset_index(drop=True)


def _skipped(frame: pd.DataFrame) -> pd.DataFrame:
    sk = _label_frame(frame[frame["status"] == "skipped"])
    if sk.empty:
        return pd.DataFrame()
    out = (sk.groupby(["backbone", "label", "task", "reason"], dropna=False, sort=True)["instance"]
           .nunique().rename("instances").reset_index())
    out["_pre"] = out["label"] != "pretrained"
    return out.sort_values(["backbone", "task", "_pre", "label"]).drop(columns="_pre")


# ---------------------------------------------------------------------------------------------
# plots
def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    fig.set_layout_engine("constrained")
    return fig


def _colors(labels: Sequence[str]) -> dict[str, str]:
    per = [lab for lab in labels if lab != "pretrained"]
    out = {"pretrained": PRETRAINED_COLOR}
    out.update({lab: PALETTE[i % len(PALETTE)] for i, lab in enumerate(per)})
    return out


def _wrap(name: str, width: int = 15) -> str:
    """Break a long model name at underscores into lines of about ``width`` characters."""
    lines, cur = [], ""
    for part in name.split("_"):
        piece = part if not cur else "_" + part
        if cur and len(cur) + len(piece) > width:
            lines.append(cur + "_")
            cur = part
        else:
            cur += piece
    return "\n".join(lines + [cur])


def _short(label: str) -> str:
    return label.replace("personalised · ", "P: ")


def _ylim_top(stats: pd.DataFrame) -> float:
    """Room for the tallest bar + error bar (x100); small metrics (detection ~1) stay visible."""
    top = (100 * (stats["mean"] + stats["std"].fillna(0))).max()
    return float(np.clip(1.15 * top if np.isfinite(top) else 105, 1.0, 105.0))


def plot_task_bars(frame: pd.DataFrame, path: Path) -> Path | None:
    rows = _label_frame(_headline_rows(frame))
    if rows.empty:
        return None
    st = _stats(rows, ["backbone", "label", "task"])
    tasks, labels = _tasks(rows), _order_labels(st["label"])
    backbones = sorted(st["backbone"].unique())
    colors = _colors(labels)
    fig = _figure(3.2 * len(tasks) + 0.8, 3.6)
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    width = 0.8 / max(1, len(labels))
    for ax, task in zip(axes, tasks):
        for j, lab in enumerate(labels):
            sub = st[(st["task"] == task) & (st["label"] == lab)].set_index("backbone")
            means = [100 * sub["mean"].get(b, np.nan) for b in backbones]
            errs = [100 * np.nan_to_num(sub["std"].get(b, 0.0)) for b in backbones]
            x = np.arange(len(backbones)) + (j - (len(labels) - 1) / 2) * width
            ax.bar(x, means, width, yerr=errs, color=colors[lab], capsize=2,
                   label=_short(lab), edgecolor="white", linewidth=0.5)
        ax.set_title(f"{task} ({METRIC_NAME.get(HEADLINE.get(task, ''), '')})", fontsize=10)
        ax.set_xticks(np.arange(len(backbones)), [_wrap(b) for b in backbones], fontsize=8)
        ax.set_ylim(0, _ylim_top(st[st["task"] == task]))
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    axes[0].set_ylabel("x100, mean ± std over instances", fontsize=8)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=min(4, len(names)), fontsize=8,
               frameon=False)
    fig.savefig(path)
    return path


def plot_cfg_curves(frame: pd.DataFrame, path: Path) -> Path | None:
    rows = _headline_rows(frame)
    per = rows[(rows["model"] != "pretrained") & rows["cfg"].notna()]
    if per.empty or per["cfg"].nunique() < 2:
        return None
    st = _stats(per, ["backbone", "generator", "caption_source", "task", "cfg"])
    pre = _stats(rows[rows["model"] == "pretrained"], ["backbone", "task"])
    tasks = _tasks(per)
    fig = _figure(3.2 * len(tasks) + 0.8, 3.4)
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    lines = sorted({(b, g, c) for b, g, c in zip(st["backbone"], st["generator"], st["caption_source"])})
    backbones = sorted({b for b, _, _ in lines})
    for ax, task in zip(axes, tasks):
        for i, (b, g, c) in enumerate(lines):
            s = st[(st["task"] == task) & (st["backbone"] == b) & (st["generator"] == g) &
                   (st["caption_source"] == c)].sort_values("cfg")
            if s.empty:
                continue
            color = PALETTE[i % len(PALETTE)]
            m, e = 100 * s["mean"].to_numpy(), 100 * np.nan_to_num(s["std"].to_numpy())
            ax.plot(s["cfg"], m, "o-", color=color, label=f"{b} · {g} · {c}")
            ax.fill_between(s["cfg"], m - e, m + e, color=color, alpha=0.15)
        for r in pre[pre["task"] == task].itertuples():
            first = next(i for i, line in enumerate(lines) if line[0] == r.backbone) \
                if r.backbone in backbones else 0
            ax.axhline(100 * r.mean, color=PALETTE[first % len(PALETTE)], ls=":", lw=1.5,
                       label=f"{r.backbone} · pretrained")
        ax.set_title(f"{task} ({METRIC_NAME.get(HEADLINE.get(task, ''), '')}) vs CFG", fontsize=10)
        ax.set_xlabel("classifier-free guidance scale", fontsize=8)
        ax.grid(alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=min(2, len(names)), fontsize=8,
               frameon=False)
    fig.savefig(path)
    return path


def plot_scene_bars(frame: pd.DataFrame, path: Path) -> Path | None:
    table = scene_table(frame)
    if table.empty:
        return None
    scenes = [s for s in _scenes(table) if s != "all"]
    backbones = sorted(table["backbone"].unique())
    labels = _order_labels(table["label"])
    colors = _colors(labels)
    fig = _figure(max(5.0, 1.3 * len(scenes) * len(backbones) + 1), 3.6)
    axes = fig.subplots(1, len(backbones), squeeze=False)[0]
    width = 0.8 / max(1, len(labels))
    for ax, bb in zip(axes, backbones):
        sub = table[table["backbone"] == bb].set_index("label")
        for j, lab in enumerate(labels):
            if lab not in sub.index:
                continue
            means = [100 * sub.loc[lab].get(f"{s}_mean", np.nan) for s in scenes]
            errs = [100 * np.nan_to_num(sub.loc[lab].get(f"{s}_std", 0.0)) for s in scenes]
            x = np.arange(len(scenes)) + (j - (len(labels) - 1) / 2) * width
            ax.bar(x, means, width, yerr=errs, color=colors[lab], capsize=2, label=_short(lab),
                   edgecolor="white", linewidth=0.5)
        ax.set_xticks(np.arange(len(scenes)), [s.replace("_and_", "+").replace("_", " ")
                                               for s in scenes], fontsize=8)
        ax.set_title(f"{bb}: classification AP per scene", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=min(4, len(names)), fontsize=8,
               frameon=False)
    fig.savefig(path)
    return path


def _as_image(img: Any, size: int = 160):
    from PIL import Image

    im = img if isinstance(img, Image.Image) else Image.open(img)
    im = im.convert("RGB")
    im.thumbnail((size, size))
    return np.asarray(im)


def plot_retrieval_examples(examples: Sequence[Any], path: Path, max_k: int = 5) -> Path | None:
    """Rows: query | its top-k gallery images, framed green (relevant) or red (not)."""
    if not examples:
        return None
    norm = []
    for ex in examples:
        if isinstance(ex, dict):
            ex = (ex["query"], ex["results"], ex.get("relevant", []))
        q, results, rel = ex
        results = list(results)[:max_k]
        rel = list(rel)[:len(results)] + [None] * (len(results) - len(rel))
        norm.append((q, results, rel))
    k = max(len(r) for _, r, _ in norm)
    fig = _figure(1.55 * (k + 1), 1.75 * len(norm))
    axes = fig.subplots(len(norm), k + 1, squeeze=False)
    for i, (q, results, rel) in enumerate(norm):
        cells = [(q, "query", "#1a73e8")] + [
            (im, f"#{j + 1} " + ("relevant" if r else "other" if r is not None else ""),
             "#188038" if r else "#d93025" if r is not None else "#5f6368")
            for j, (im, r) in enumerate(zip(results, rel))]
        for j in range(k + 1):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(cells):
                ax.set_axis_off()
                continue
            im, title, color = cells[j]
            ax.imshow(_as_image(im))
            ax.set_title(title, fontsize=8, color=color)
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(4 if j else 3)
    fig.savefig(path)
    return path


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
"""


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

    plots: list[tuple[Path, str]] = []
    p = plot_task_bars(frame, plots_dir / "tasks.png")
    if p:
        plots.append((p, "Headline metric per task: pretrained vs personalised, per backbone"))
        h.append(_img_tag(p, plots[-1][1]))
        md += [f"![{plots[-1][1]}](plots/{p.name})", ""]

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
        plots.append((p, "Headline metric vs classifier-free guidance scale (band = ± std)"))
        h.append(_img_tag(p, plots[-1][1]))
        md += [f"![{plots[-1][1]}](plots/{p.name})", ""]

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
            plots.append((p, "Classification AP per test scene"))
            h.append(_img_tag(p, plots[-1][1]))
            md += [f"![{plots[-1][1]}](plots/{p.name})", ""]

    # retrieval examples
    if examples:
        p = plot_retrieval_examples(examples, plots_dir / "retrieval_examples.png")
        if p:
            h.append("<h2>Retrieval examples</h2>")
            md += ["## Retrieval examples", ""]
            plots.append((p, "Queries and their top-ranked gallery images "
                             "(green = same instance, red = another instance)"))
            h.append(_img_tag(p, plots[-1][1]))
            md += [f"![{plots[-1][1]}](plots/{p.name})", ""]

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
