"""Report plots (matplotlib, Agg canvas, no pyplot state): bars per task, CFG curves, per-scene
bars and a retrieval example grid."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from persrep.report.tables import (HEADLINE, METRIC_NAME, _headline_rows, _label_frame, _order_labels,
                                   _scenes, _stats, _tasks, scene_table)

PRETRAINED_COLOR = "#9aa0a6"
PALETTE = ["#1a73e8", "#e8710a", "#188038", "#a142f4", "#d93025", "#12b5cb", "#f9ab00", "#5f6368"]


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

