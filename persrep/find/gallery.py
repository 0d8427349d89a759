"""``find.html`` and ``hits.csv``: what a person reads after ``persrep find``.

The page, top to bottom:

1. one line per instance (first screen): its first reference photo, *likely* and *possible*
   counts, a flag when the guard fired (with why), a link to the instance's section;
2. per photo: which of my objects are in this photo (every photo with a hit, linked);
3. per instance: the reference photos, the likely and possible hits (the top ones as thumbnails,
   with the dense head's box and mask drawn when it gave one; the rest as links), the near
   misses (best-scoring photos that are not hits);
4. the job's figures (photos, unreadable files, throughput, the rule).

Thumbnails link to the photo (``file://`` for a local collection, its ``s3://`` URI otherwise);
long file names are shortened in the middle (the full name is the link's title). One
self-contained page (thumbnails inlined as JPEG data URIs, the run report's stylesheet); the
driver reads only the photos it shows, never the whole collection.
"""

from __future__ import annotations

import base64
import csv
import html
import io
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from persrep.find.collection import Collection, load_image
from persrep.report.page import CSS

__all__ = ["gallery_html", "overlay", "hits_csv", "short_name", "photo_link"]

THUMB = 180
ICON = 44
MAX_LINKS = 300  # per list of links (hits beyond the thumbnails, photos of the per-photo view)
EXTRA_CSS = """
.grid{display:flex;flex-wrap:wrap;gap:10px;margin:6px 0 16px}
.card{background:#fff;box-shadow:0 1px 2px rgba(0,0,0,.12);padding:6px;width:188px;font-size:13px}
.card img{display:block;width:180px;height:auto}
.card .name{color:#555;font-size:12px;overflow:hidden;white-space:nowrap}
.likely{color:#188038;font-weight:600}.possible{color:#b06000;font-weight:600}.miss{color:#777}
table.overview td,table.overview th{padding:3px 10px;vertical-align:middle}
table.overview img{width:44px;height:44px;object-fit:cover;display:block}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.flag{background:#fef7e0;border-left:4px solid #f9ab00;padding:6px 10px;margin:8px 0}
ul.links{columns:3;font-size:13px}
"""


# the --model option in words (the page's subtitle)
MODEL_WORDS = {"personalised": "personalised models", "both": "personalised models",
               "pretrained": "pretrained model only"}


def short_name(name: str, width: int = 32) -> str:
    """``name`` shortened in the middle to ``width`` characters (``abc…xyz``)."""
    if len(name) <= width:
        return name
    keep = width - 1
    return name[: (keep + 1) // 2] + "\u2026" + name[len(name) - keep // 2:]


def photo_link(collection: Collection, rel: str) -> str:
    """Where a browser finds the photo: ``file://`` for a local collection, else its URI."""
    uri = collection.uri
    if uri.startswith("s3://") or "://" in uri and not uri.startswith("file://"):
        return f"{uri.rstrip('/')}/{rel}"
    base = Path(uri[len("file://"):] if uri.startswith("file://") else uri).expanduser().absolute()
    return "file://" + quote(str(base / rel))


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


def _data_uri(img: Image.Image, size: int = THUMB) -> str:
    im = img.convert("RGB")
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=82)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _tier(tier: str) -> str:
    if tier == "likely":
        return '<span class="likely">likely</span>'
    if tier == "possible":
        return '<span class="possible">possible</span>'
    return '<span class="miss">not a hit</span>'


def _anchor(inst: str) -> str:
    return "i-" + "".join(c if c.isalnum() or c in "-_" else "_" for c in inst)


def _link(collection: Collection, rel: str, width: int = 40) -> str:
    return (f'<a href="{html.escape(photo_link(collection, rel))}" title="{html.escape(rel)}">'
            f"{html.escape(short_name(rel, width))}</a>")


def _hit_card(collection: Collection, row: dict[str, Any]) -> str:
    item = load_image(collection, row["path"])
    href = html.escape(photo_link(collection, row["path"]))
    if item.image is None:
        pic = "<p>(unreadable)</p>"
    else:
        img = overlay(item.image, row["box"], row["mask_rle"], row["mask_size"])
        pic = f'<a href="{href}"><img alt="{html.escape(row["path"])}" src="{_data_uri(img)}"/></a>'
    return (f'<div class="card">{pic}<div class="name" title="{html.escape(row["path"])}">'
            f'{html.escape(short_name(row["path"], 30))}</div>'
            f"<div>{_tier(row['tier'])} &middot; score {row['score']:.3f}</div></div>")


def gallery_html(source, collection: Collection, summary: dict[str, Any], hits: pa.Table) -> str:
    rows = hits.to_pylist()
    ds = source.dataset
    insts = summary["instances"]
    n_likely = sum(v["likely"] for v in insts.values())
    n_possible = sum(v["possible"] for v in insts.values())
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>persrep find: "
             f"{len(insts)} objects in {summary['images_scanned']} photos</title>"
             f"<style>{CSS}{EXTRA_CSS}</style></head><body>",
             f"<header><h1>Your objects in {summary['images_scanned']} photos</h1><div class='meta'>"
             f"{n_likely} likely and {n_possible} possible hits for {len(insts)} objects &middot; "
             f"{MODEL_WORDS.get(summary['model'], summary['model'])} &middot; run "
             f"{html.escape(source.run_id)}</div></header><main>"]
    for inst, why in summary.get("flagged", {}).items():
        parts.append(f"<div class='flag'><b>{html.escape(inst)}</b>: {html.escape(why)}</div>")
    # 1. one line per instance
    lines = []
    for inst, info in insts.items():
        ref = ds.read_image(ds.instances[inst].train[0])
        flag = " &#9888;" if info.get("flag") else ""
        lines.append(f"<tr><td><a href='#{_anchor(inst)}'><img alt='{html.escape(inst)}' "
                     f"src='{_data_uri(ref, ICON * 2)}'/></a></td><td><a href='#{_anchor(inst)}' "
                     f"title='{html.escape(inst)}'>{html.escape(short_name(inst, 28))}</a>{flag}</td>"
                     f"<td class='num likely'>{info['likely']}</td><td class='num possible'>{info['possible']}</td>"
                     f"<td>{html.escape(str(info.get('category', '')))}</td></tr>")
    parts.append("<table class='overview'><tr><th></th><th>object</th><th>likely</th><th>possible</th>"
                 "<th>category</th></tr>" + "".join(lines) + "</table>")
    # 2. per photo
    by_photo: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["decision"]:
            by_photo.setdefault(r["path"], []).append(r)
    items = sorted(by_photo.items())
    photo_rows = "".join(
        f"<tr><td>{_link(collection, p, 48)}</td><td>" + ", ".join(
            f"<a href='#{_anchor(r['instance'])}'>{html.escape(short_name(r['instance'], 24))}</a> "
            f"({_tier(r['tier'])})" for r in sorted(rs, key=lambda r: (r["tier"] != "likely", -r["score"])))
        + "</td></tr>" for p, rs in items[:MAX_LINKS])
    more = f"<p class='cap'>{len(items) - MAX_LINKS} more photos in hits.csv</p>" if len(items) > MAX_LINKS else ""
    parts.append(f"<h2>Photos with a hit ({len(items)})</h2><details><summary>which of your objects are in "
                 f"each photo</summary><table class='kv'><tr><th>photo</th><th>objects</th></tr>{photo_rows}"
                 f"</table>{more}</details><p class='cap'>Every hit: <code>hits.csv</code> (and hits.parquet) "
                 "beside this page.</p>")
    # 3. per instance
    for inst, info in insts.items():
        mine = [r for r in rows if r["instance"] == inst]
        parts.append(f"<h2 id='{_anchor(inst)}'>{html.escape(inst)}</h2><p class='cap'>"
                     f"<span class='likely'>{info['likely']} likely</span>, <span class='possible'>"
                     f"{info['possible']} possible</span> ({100 * info['share']:.1f} % of the photos) "
                     f"&middot; {info['model']} model ({html.escape(str(info['data_config']))})</p>")
        if info.get("flag"):
            parts.append(f"<div class='flag'>{html.escape(info['flag'])}</div>")
        refs = [ds.read_image(p) for p in ds.instances[inst].train]
        parts.append("<h3>Reference photos</h3><div class='grid'>" + "".join(
            f"<div class='card'><img alt='reference {k + 1}' src='{_data_uri(im)}'/>"
            f"<div>reference {k + 1}</div></div>" for k, im in enumerate(refs)) + "</div>")
        top = sorted([r for r in mine if r["top"]], key=lambda r: (r["tier"] != "likely", -r["score"]))
        if top:
            parts.append("<h3>Best hits</h3><div class='grid'>" + "".join(_hit_card(collection, r) for r in top)
                         + "</div>")
        else:
            parts.append("<p class='note'>No photo is a hit for this object.</p>")
        rest = [r for r in mine if r["decision"] and not r["top"]]
        if rest:
            parts.append(f"<details><summary>{len(rest)} more hits</summary><ul class='links'>" + "".join(
                f"<li>{_link(collection, r['path'])} {_tier(r['tier'])}</li>" for r in rest[:MAX_LINKS])
                + "</ul></details>")
        border = sorted([r for r in mine if r["borderline"]], key=lambda r: -r["score"])
        if border:
            parts.append("<h3>Near misses</h3><p class='cap'>the best-scoring photos that are not hits</p>"
                         "<div class='grid'>" + "".join(_hit_card(collection, r) for r in border) + "</div>")
    # 4. the job
    sec = summary["seconds"]
    kv = [("photos listed", summary["images_listed"]), ("photos searched", summary["images_scanned"]),
          ("unreadable (skipped)", summary["unreadable"]), ("other files ignored", summary["files_ignored"]),
          ("throughput", f"{summary['throughput_images_per_s']:.1f} photos/s ({summary['runner']}, "
                         f"{summary['workers']} worker(s))"),
          ("embeddings computed / reused", f"{summary['embeddings_computed']} / {summary['embeddings_reused']}"),
          ("time", f"references {sec['references']:.1f} s, scan {sec['scan']:.1f} s, "
                   f"boxes+masks {sec['localization']:.1f} s, total {sec['total']:.1f} s"),
          ("how a hit is decided", summary["calibration"]["rule"])]
    parts.append("<h2>About this search</h2><table class='kv'>" + "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in kv) + "</table>")
    if summary["unreadable_files"]:
        parts.append("<details><summary>Unreadable files (skipped)</summary><ul>" + "".join(
            f"<li><code>{html.escape(u['path'])}</code>: {html.escape(u['error'])}</li>"
            for u in summary["unreadable_files"]) + "</ul></details>")
    parts.append("</main></body></html>")
    return "\n".join(parts)


def hits_csv(hits: pa.Table) -> bytes:
    """Every hit (likely and possible), one row per photo x object, best first per object."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "instance", "tier", "score", "z", "margin", "box_x", "box_y", "box_w", "box_h"])
    for r in hits.to_pylist():
        if not r["decision"]:
            continue
        box = list(r["box"]) if r["box"] else ["", "", "", ""]
        w.writerow([r["path"], r["instance"], r["tier"], f"{r['score']:.4f}", f"{r['z']:.2f}",
                    f"{r['margin']:.2f}", *box])
    return buf.getvalue().encode()
