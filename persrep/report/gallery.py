"""Per-instance image galleries for the report: what the run saw, generated and predicted.

For every evaluated instance, one collapsed ``<details>`` block (the page opens with all of them
closed; thumbnails load lazily, so 100 instances cost one HTML page of links until one is opened):

- the real training photos, with the mask outlined when the data set has masks;
- samples of each data configuration's synthetic positives (cut-and-paste composites, DreamBooth
  images, ...) with their filter score, kept and rejected side by side when filtering rejected
  some; the negatives the instance was trained against (generated or an external folder);
- retrieval: fixed queries (the instance's first test images) and their top-5 gallery hits,
  pretrained vs each personalised model, correct hits framed green, wrong ones red;
- detection / segmentation: predicted box and mask outline vs the ground truth on the instance's
  first dense images, pretrained vs personalised, with the mask IoU.

Sources: ``units.json`` of the run (which units made it), the units in storage (synthesis shards,
evaluation ``examples.json``), and the data set named in ``summary.json``. Thumbnails are small
JPEGs in ``<report>/thumbs/`` (:mod:`persrep.report.thumbs`); originals are never inlined.
"""

from __future__ import annotations

import html
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from persrep.report.tables import run_root
from persrep.report.thumbs import BLUE, GREEN, ORANGE, RED, Thumbs

POSITIVES_SHOWN, NEGATIVES_SHOWN, REJECTED_SHOWN = 4, 6, 4

GALLERY_CSS = """
details.inst{background:#fff;margin:6px 0;padding:6px 12px;box-shadow:0 1px 2px rgba(0,0,0,.08)}
details.inst>summary{font-size:15px} details.inst .sub{color:#5f6368;font-weight:400;font-size:13px}
.gal h4{margin:10px 0 4px;font-size:14px}.gal .row{display:flex;flex-wrap:wrap;gap:6px;align-items:flex-start;margin:2px 0 6px}
.gal .lab{width:150px;font-size:12px;color:#3c4043;align-self:center;overflow-wrap:anywhere}
.gal figure{margin:0;padding:2px;box-shadow:none;background:none;width:128px}
.gal figure img{width:128px;height:auto;display:block;background:#eee}
.gal figcaption{font-size:11px;line-height:1.2}.gal .sep{width:10px}
.gal .rej img{opacity:.75}.gal .rej figcaption{color:#d93025}.gal .low figcaption{color:#d93025;font-weight:600}
"""


def _fig(src: str, caption: str, cls: str = "") -> str:
    return (f'<figure class="{cls}"><img loading="lazy" decoding="async" src="{html.escape(src)}" '
            f'alt="{html.escape(caption)}"/><figcaption>{html.escape(caption)}</figcaption></figure>')


def _row(label: str, figures: list[str]) -> str:
    return f'<div class="row"><div class="lab">{html.escape(label)}</div>{"".join(figures)}</div>'


class Gallery:
    def __init__(self, run_source: str, summary: dict[str, Any], settings: dict[str, Any] | None,
                 out_dir: str | Path):
        from persrep.storage import Storage

        self.settings = settings or {}
        endpoint = (self.settings.get("storage") or {}).get("s3_endpoint")
        self.storage = Storage(run_root(run_source), endpoint)
        self.units = json.loads(self.storage.read_bytes(f"runs/{str(run_source).rstrip('/').rsplit('/', 1)[1]}/units.json"))
        self.data = summary.get("data")
        self.thumbs = Thumbs(out_dir)
        self._ds = None
        self.endpoint = endpoint
        from persrep.report.automasks import AutoMasks

        self.auto = AutoMasks(run_source, self.settings, self.units)

    @property
    def ds(self):
        if self._ds is None:
            from persrep.data.layout import open_dataset

            self._ds = open_dataset(self.data, self.endpoint)
        return self._ds

    def _units(self, stage: str) -> list[dict[str, Any]]:
        return [u for u in self.units if u["stage"] == stage and u.get("key") and u["status"] != "failed"]

    # -- data -----------------------------------------------------------------------------------
    def _image(self, rel: str, *, mask: bool = False, boxes=None, frame=None, mask_color=ORANGE,
               pred_mask: np.ndarray | None = None) -> str:
        ds = self.ds
        mask_fn: Any = None
        if pred_mask is not None:
            mask_fn = pred_mask
        elif mask and rel in ds.masks:
            mask_fn = lambda: ds.read_mask(rel)  # noqa: E731 - read only if not cached
        return self.thumbs.make(lambda: ds.read_image(rel), key=f"{self.data}|{rel}|{mask}|"
                                f"{None if pred_mask is None else np.packbits(pred_mask).tobytes().hex()}",
                                mask=mask_fn, boxes=boxes, frame=frame, mask_color=mask_color)

    def _examples(self) -> dict[str, list[tuple[str, dict[str, Any]]]]:
        """instance -> [(model label, examples)], pretrained first."""
        out: dict[str, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
        one_backbone = len({u["label"].split(":")[1] for u in self._units("evaluation")
                            if u["label"].count(":") >= 2}) <= 1
        for u in self._units("evaluation"):
            try:
                doc = json.loads(self.storage.read_unit_file("evaluations", u["key"], "examples.json"))
            except Exception:  # noqa: BLE001 - evaluated before galleries existed: no examples
                continue
            keys = doc.get("keys") or {}
            label = "pretrained" if keys.get("model") == "pretrained" else str(keys.get("data_config"))
            if not one_backbone:
                label = f"{keys.get('backbone')} · {label}"
            for inst, ex in (doc.get("instances") or {}).items():
                out[inst].append((label, ex))
        for inst in out:
            out[inst].sort(key=lambda t: (t[0] != "pretrained", t[0]))
        return out

    def _synthesis(self) -> tuple[dict[str, list[tuple[str, Any]]], dict[str, str]]:
        """instance -> [(data config label, rows)] of its positives; category -> negatives unit key."""
        from persrep.generation.plan import row_config
        from persrep.generation.shards import read_unit

        pos: dict[str, list[tuple[str, Any]]] = defaultdict(list)
        neg: dict[str, str] = {}
        for u in self._units("synthesis"):
            kind, _, owner = u["label"].partition(":")
            owner = owner.rsplit(":", 1)[-1]
            if kind == "neg":
                neg[owner] = u["key"]
                continue
            if kind != "pos":
                continue
            rows = read_unit(self.storage, u["key"], kept_only=False).to_pylist()
            if not rows:
                continue
            r0 = rows[0]
            label = row_config(r0["generator"], r0.get("cfg"), r0.get("caption_source")).label
            pos[owner].append((label, rows))
        for inst in pos:
            pos[inst].sort()
        return pos, neg

    def _negatives(self, category: str, neg_keys: dict[str, str]) -> list[str]:
        from persrep.generation.shards import read_unit

        figs = []
        if category in neg_keys:
            rows = read_unit(self.storage, neg_keys[category], kept_only=True).to_pylist()[:NEGATIVES_SHOWN]
            for r in rows:
                figs.append(_fig(self.thumbs.make(r["image"]), _score_text(r)))
            return figs
        pz = self.settings.get("personalization") or {}
        if pz.get("negatives") == "external" and pz.get("external_negatives"):
            from persrep.data.layout import is_image_name, resolve_data_path
            from persrep.storage import Storage

            where = resolve_data_path(str(pz["external_negatives"]), str(self.data))
            try:
                st = Storage(where, self.endpoint)
                files = sorted(f for f, _ in st.list_files() if is_image_name(f.rsplit("/", 1)[-1]))
            except Exception:  # noqa: BLE001 - the folder moved since the run: no negatives shown
                return []
            own = [f for f in files if f.startswith(f"{category}_negatives/")] or files
            for f in own[:NEGATIVES_SHOWN]:
                figs.append(_fig(self.thumbs.make(lambda f=f: st.read_bytes(f), key=f"{where}|{f}"),
                                 f"external: {f.rsplit('/', 1)[-1]}"))
        return figs

    # -- the page -------------------------------------------------------------------------------
    def html(self, instances: list[str], headline: dict[str, str] | None = None) -> str:
        examples = self._examples()
        pos, neg = self._synthesis()
        parts = []
        for name in instances:
            inst = self.ds.instances.get(name)
            if inst is None:
                continue
            sub = f" · {headline[name]}" if headline and name in headline else ""
            body = [self._train(name), self._positives(pos.get(name, [])),
                    self._negatives_row(inst.category, neg), self._retrieval(examples.get(name, [])),
                    self._dense(examples.get(name, []))]
            parts.append(f'<details class="inst gal"><summary>{html.escape(name)} '
                         f'<span class="sub">({html.escape(inst.category)}){html.escape(sub)}</span>'
                         f'</summary>{"".join(b for b in body if b)}</details>')
        return "".join(parts)

    def _train_figure(self, name: str, i: int, rel: str, *, caption: str | None = None) -> tuple[str, bool]:
        """A training photo with its mask outlined: the data set's, else the run's automatic mask
        (captioned with its confidence). Returns (figure, whether a mask was drawn)."""
        base = rel.rsplit("/", 1)[-1]
        if rel in self.ds.masks or name not in self.auto.masks:
            return _fig(self._image(rel, mask=True), caption or base), rel in self.ds.masks
        m = self.auto.mask(name, i)
        conf = self.auto.masks[name].confidence
        c = f"auto mask {conf[i]:.2f}" if i < len(conf) else "auto mask"
        low = self.auto.threshold is not None and i < len(conf) and conf[i] < self.auto.threshold
        return (_fig(self._image(rel, pred_mask=m), f"{caption or base} · {c}", "low" if low else ""),
                m is not None)

    def _train(self, name: str) -> str:
        rels = self.ds.instances[name].train
        made = [self._train_figure(name, i, r) for i, r in enumerate(rels)]
        masked = any(drawn for _, drawn in made)
        return f"<h4>Training photos{' (mask outlined)' if masked else ''}</h4>" + _row("real", [f for f, _ in made])

    def low_masks_html(self, low: dict[str, list[int]]) -> str:
        """One row per instance with uncertain automatic masks: all its training photos with the
        mask outlined and each mask's confidence (the uncertain ones captioned in red)."""
        rows = []
        for name in sorted(low):
            inst = self.ds.instances.get(name)
            if inst is None:
                continue
            figs = [self._train_figure(name, i, r, caption=f"#{i}")[0] for i, r in enumerate(inst.train)]
            images = ", ".join(f"#{i}" for i in low[name])
            rows.append(_row(f"{name}: {images}", figs))
        return f'<div class="gal">{"".join(rows)}</div>' if rows else ""

    def _positives(self, configs: list[tuple[str, list[dict[str, Any]]]]) -> str:
        if not configs:
            return ""
        rows = []
        for label, recs in configs:
            ok = [r for r in recs if r.get("image") and r.get("kept") and not r.get("error")]
            rejected = [r for r in recs if r.get("image") and not r.get("kept") and not r.get("error")]
            figs = [_fig(self.thumbs.make(r["image"]), _score_text(r)) for r in ok[:POSITIVES_SHOWN]]
            if rejected:
                figs.append('<div class="sep"></div>')
                figs += [_fig(self.thumbs.make(r["image"]), _score_text(r), "rej")
                         for r in rejected[:REJECTED_SHOWN]]
            tail = f" ({len(ok)} kept, {len(rejected)} rejected)" if rejected else f" ({len(ok)} rows)"
            rows.append(_row(label + tail, figs))
        return "<h4>Synthetic positives per data configuration</h4>" + "".join(rows)

    def _negatives_row(self, category: str, neg: dict[str, str]) -> str:
        figs = self._negatives(category, neg)
        return "<h4>Negatives</h4>" + _row(category, figs) if figs else ""

    def _retrieval(self, models: list[tuple[str, dict[str, Any]]]) -> str:
        rows = []
        for label, ex in models:
            for q in ex.get("retrieval") or []:
                figs = [_fig(self._image(q["query"], frame=BLUE), "query")]
                for rank, (hit, ok) in enumerate(zip(q["hits"], q["correct"]), 1):
                    figs.append(_fig(self._image(hit, frame=GREEN if ok else RED),
                                     f"#{rank} {'✓' if ok else '✗'} {hit.split('/')[-2] if '/' in hit else hit}"))
                rows.append(_row(f"{label}: {sum(q['correct'])}/{len(q['correct'])} correct", figs))
        if not rows:
            return ""
        return ("<h4>Retrieval: query (blue) and top-5 gallery hits (green = this instance, red = another)</h4>"
                + "".join(rows))

    def _dense(self, models: list[tuple[str, dict[str, Any]]]) -> str:
        from persrep.evaluation.examples import unpack_mask

        images: dict[str, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
        for label, ex in models:
            for d in ex.get("dense") or []:
                images[d["image"]].append((label, d))
        if not images:
            return ""
        rows = []
        for rel, preds in images.items():
            gt_box = preds[0][1].get("gt_box")
            figs = [_fig(self._image(rel, mask=True, mask_color=GREEN, boxes=[(gt_box, GREEN)]), "ground truth")]
            for label, d in preds:
                m = unpack_mask(d["pred_mask"]) if d.get("pred_mask") else None
                figs.append(_fig(self._image(rel, pred_mask=m, boxes=[(d.get("pred_box"), ORANGE)]),
                                 f"{label}: IoU {d.get('iou', float('nan')):.2f}"))
            rows.append(_row(rel.rsplit("/", 2)[-1] if "/" in rel else rel, figs))
        return ("<h4>Detection / segmentation: ground truth (green) vs predicted box and mask (orange)</h4>"
                + "".join(rows))


def _score_text(r: dict[str, Any]) -> str:
    s = r.get("filter_score")
    score = "" if s is None or (isinstance(s, float) and math.isnan(s)) else f"score {s:.2f} "
    return f"{score}{'kept' if r.get('kept') else 'rejected'}"


def gallery_html(run_source: str, summary: dict[str, Any], settings: dict[str, Any] | None,
                 out_dir: str | Path, instances: list[str],
                 headline: dict[str, str] | None = None) -> tuple[str, int]:
    """The galleries' HTML and how many thumbnails were written now (the rest were on disk)."""
    g = Gallery(run_source, summary, settings, out_dir)
    body = g.html(instances, headline)
    return body, g.thumbs.written


def low_masks_html(run_source: str, summary: dict[str, Any], settings: dict[str, Any] | None,
                   out_dir: str | Path, low: dict[str, list[int]]) -> str:
    """Thumbnails of the uncertain automatic masks (instance -> image indices), outlined."""
    return Gallery(run_source, summary, settings, out_dir).low_masks_html(low)


__all__ = ["GALLERY_CSS", "Gallery", "gallery_html", "low_masks_html", "run_root"]
