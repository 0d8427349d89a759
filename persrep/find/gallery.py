"""``find.html``: per instance, the reference photos, the top hits with their boxes and masks
drawn, the borderline cases on both sides of the threshold, and a summary of the job.

One self-contained page (thumbnails inlined as JPEG data URIs, the run report's stylesheet).
The driver reads only the photos it shows (top hits and borderline cases), never the collection.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from persrep.find.collection import Collection, load_image
from persrep.report.page import CSS

__all__ = ["gallery_html", "overlay"]

THUMB = 200
EXTRA_CSS = """
.grid{display:flex;flex-wrap:wrap;gap:10px;margin:6px 0 16px}
.card{background:#fff;box-shadow:0 1px 2px rgba(0,0,0,.12);padding:6px;width:212px;font-size:13px}
.card img{display:block;width:200px;height:auto}
.yes{color:#188038;font-weight:600}.no{color:#d93025;font-weight:600}
.kv td{white-space:normal}
"""


def overlay(img: Image.Image, box: list[int] | None, rle: str | None, size: list[int] | None) -> Image.Image:
    """The photo with the predicted mask tinted and the box drawn (both in its own pixels)."""
    out = img.convert("RGB")
    if rle and size:
        m = mask_utils.decode({"size": [int(size[0]), int(size[1])], "counts": rle.encode()}).astype(bool)
        if m.shape == (out.height, out.width):
            arr = np.asarray(out).copy()
            arr[m] = (0.55 * arr[m] + 0.45 * np.array([255, 64, 160])).astype(np.uint8)
            out = Image.fromarray(arr)
    if box:
        x, y, w, h = box
        width = max(2, round(max(out.size) / 100))
        ImageDraw.Draw(out).rectangle([x, y, x + w - 1, y + h - 1], outline=(255, 215, 0), width=width)
    return out


def _data_uri(img: Image.Image) -> str:
    im = img.convert("RGB")
    im.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _card(img: Image.Image | None, lines: list[str]) -> str:
    pic = f'<img alt="{html.escape(lines[0])}" src="{_data_uri(img)}"/>' if img is not None else "<p>(unreadable)</p>"
    return f'<div class="card">{pic}' + "".join(f"<div>{ln}</div>" for ln in lines) + "</div>"


def _hit_card(collection: Collection, row: dict[str, Any]) -> str:
    item = load_image(collection, row["path"])
    img = overlay(item.image, row["box"], row["mask_rle"], row["mask_size"]) if item.image is not None else None
    verdict = '<span class="yes">hit</span>' if row["decision"] else '<span class="no">no</span>'
    box = "box " + ",".join(map(str, row["box"])) if row["box"] else "no box"
    return _card(img, [html.escape(row["path"]), f"score {row['score']:.3f} {verdict} (#{row['rank'] + 1})", box])


def gallery_html(source, collection: Collection, summary: dict[str, Any], hits: pa.Table) -> str:
    rows = hits.to_pylist()
    ds = source.dataset
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>persrep find</title>"
             f"<style>{CSS}{EXTRA_CSS}</style></head><body>",
             f"<header><h1>persrep find</h1><div class='meta'>run {html.escape(source.run_id)} &middot; "
             f"photos {html.escape(summary['photos'])} &middot; model {html.escape(summary['model'])}</div></header><main>"]
    sec = summary["seconds"]
    kv = [("images listed", summary["images_listed"]), ("images scanned", summary["images_scanned"]),
          ("unreadable (skipped)", summary["unreadable"]), ("other files ignored", summary["files_ignored"]),
          ("hits", sum(v["hits"] for v in summary["instances"].values())),
          ("throughput", f"{summary['throughput_images_per_s']:.1f} images/s ({summary['runner']}, "
                         f"{summary['workers']} worker(s))"),
          ("embeddings computed / reused", f"{summary['embeddings_computed']} / {summary['embeddings_reused']}"),
          ("time", f"calibration {sec['calibration']:.1f} s, scan {sec['scan']:.1f} s, "
                   f"boxes+masks {sec['localization']:.1f} s, total {sec['total']:.1f} s"),
          ("calibration negatives", f"{summary['calibration']['negatives_pool']} "
                                    f"({summary['calibration']['negatives_pool_images']} images) + other instances' photos")]
    parts.append("<h2>Summary</h2><table class='kv'>" + "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in kv) + "</table>")
    if summary["unreadable_files"]:
        parts.append("<details><summary>Unreadable files</summary><ul>" + "".join(
            f"<li><code>{html.escape(u['path'])}</code>: {html.escape(u['error'])}</li>"
            for u in summary["unreadable_files"]) + "</ul></details>")
    for inst, info in summary["instances"].items():
        cal = info["calibration"]
        parts.append(f"<h2 id='{html.escape(inst)}'>{html.escape(inst)}</h2><p class='cap'>"
                     f"{info['model']} ({html.escape(str(info['data_config']))}) &middot; threshold "
                     f"{cal['threshold']:.3f} (max-F1 {cal['f1']:.2f} on {cal['positives']} held-out reference "
                     f"scores vs {cal['negatives']} negatives) &middot; <b>{info['hits']} hits</b> &middot; "
                     f"{html.escape(info['localization'])}</p>")
        refs = [ds.read_image(p) for p in ds.instances[inst].train]
        parts.append("<h3>Reference photos</h3><div class='grid'>" +
                     "".join(_card(im, [f"reference {k + 1}"]) for k, im in enumerate(refs)) + "</div>")
        mine = [r for r in rows if r["instance"] == inst]
        top = sorted([r for r in mine if r["top"]], key=lambda r: r["rank"])
        parts.append("<h3>Top hits</h3>" + ("<div class='grid'>" + "".join(_hit_card(collection, r) for r in top)
                                             + "</div>" if top else "<p class='note'>No photo reached the threshold.</p>"))
        border = sorted([r for r in mine if r["borderline"]], key=lambda r: -r["score"])
        if border:
            parts.append("<h3>Borderline</h3><p class='cap'>closest to the threshold, on either side</p>"
                         "<div class='grid'>" + "".join(_hit_card(collection, r) for r in border) + "</div>")
    parts.append("</main></body></html>")
    return "\n".join(parts)
