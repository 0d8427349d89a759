#!/usr/bin/env python
"""Quality on real photos with the real offline backbone: pretrained vs real-only vs cut-and-paste.

Evaluated with the reference protocol through the library (``Evaluator``: classification AP over
the whole test pool, retrieval NDCG against every instance's train images, per PODS scene), after
personalising with the library (``train_one_instance``; cut-and-paste positives from
``CutPasteGenerator``). Settings come from ``persrep/configs/offline-real.yaml`` (+ overrides).

Data (built under ``--work``, never in the repo):

(a) **COIL composites**: COIL-100 subset imported with train views 0/24/48 (0/120/240 degrees) and
    turned into PODS-style scenes by :func:`persrep.data.composite.write_composite`. The 40 real
    background photos are split into two disjoint halves: test scenes use one, cut-and-paste
    positives use the other (``@data/backgrounds``), so training never sees a test background.
    Three COIL objects are held out as distractors (never evaluated).
(b) **DreamBooth** (29 real instances, no masks): real-only; near saturation (~94 AP).
    ``--dreambooth-configs real_only,cut_paste_auto`` adds cut-and-paste from *predicted* masks
    (``segmentation.*``, GrabCut by default) pasted on the composite's training backgrounds.

Data configuration ``cut_paste_auto`` (COIL or DreamBooth): cut-and-paste whose train masks are
predicted by the segmenter instead of read from the data set: what a user with 3 plain photos gets.
On COIL its runs also record the predicted masks' IoU against the provided ones.

Negatives never come from the evaluated data set (docs/PROTOCOL.md, leakage): COIL uses the
DreamBooth photos; DreamBooth uses COIL views + background photos. One variant, ``in_pool``,
trains with the other evaluated instances' photos as negatives to show the inflation; it is
labelled ``LEAKY`` in the table and ``"leaky": true`` in the JSON, and never compared as a result.

Output: a table on stdout and ``bench/quality.json`` (settings, per-instance values, means, std,
paired deltas vs pretrained, time per instance, machine, timestamp). ``--record-as NAME`` stores
the run under ``investigation[NAME]`` of the existing JSON instead (keeps the main result): that is
how every variant tried is kept next to the headline numbers.

    .venv/bin/python bench/quality.py                          # default: ~15-20 min on 2 free cores
    .venv/bin/python bench/quality.py --coil-instances 14 --steps 150 --dense   # fuller, slower
    .venv/bin/python bench/quality.py --record-as lr3e-4 personalization.learning_rate=3e-4
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from persrep.config import load_settings, settings_to_dict  # noqa: E402
from persrep.contrastive.train import TrainingData, train_one_instance  # noqa: E402
from persrep.data.composite import CompositeSettings, write_composite  # noqa: E402
from persrep.data.importer import import_folder  # noqa: E402
from persrep.data.layout import InstanceDataset, is_image_name, open_dataset  # noqa: E402
from persrep.evaluation.aggregate import HEADLINE as HEADLINE_METRIC, results_frame  # noqa: E402
from persrep.evaluation.stage import Evaluator  # noqa: E402
from persrep.generation.base import InstanceData, SampleRow  # noqa: E402
from persrep.hashing import stable_seed  # noqa: E402
from persrep.generation.cut_paste import CutPasteGenerator  # noqa: E402
from persrep.segmentation import get_segmenter  # noqa: E402
from persrep.segmentation.dataset import mask_iou  # noqa: E402

HEADLINE = list(HEADLINE_METRIC.items())  # [(task, metric)] in the paper's order
NEG_SIDE = 256  # external negatives are downscaled to this shorter side (memory, decode time)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def shared_data_dir() -> Path:
    env = os.environ.get("PERSREP_SHARED_DATA")
    d = Path(env) if env else REPO.parent / "shared" / "data"
    if not d.is_dir():
        sys.exit(f"real data not found at {d}: set PERSREP_SHARED_DATA")
    return d


# -- data --------------------------------------------------------------------------------------
def prepare_data(work: Path, shared: Path, cs: CompositeSettings) -> tuple[Path, Path, Path]:
    work.mkdir(parents=True, exist_ok=True)
    coil = work / "coil"
    if not coil.exists():
        import_folder(shared / "coil100_subset", coil, masks=shared / "coil100_subset_masks",
                      train_indices="0,24,48")
    comp = write_composite(coil, shared / "backgrounds", work / f"coil_composite-s{cs.seed}-t{cs.test_per_instance}"
                           f"-d{cs.dense_per_instance}-n{len(cs.negative_instances) if isinstance(cs.negative_instances, tuple) else cs.negative_instances}",
                           cs, progress=log)
    db = work / "dreambooth"
    if not db.exists():
        import_folder(shared / "dreambooth", db)
    return coil, comp.dest, db


def downscale(img: Image.Image, side: int = NEG_SIDE) -> Image.Image:
    img = img.convert("RGB")
    s = side / min(img.size)
    return img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))),
                      Image.Resampling.BILINEAR) if s < 1 else img


def folder_images(pattern_root: Path, limit: int | None = None, seed: int = 0) -> list[Image.Image]:
    files = sorted(f for f in glob.glob(str(pattern_root / "**" / "*"), recursive=True)
                   if is_image_name(os.path.basename(f)))
    if limit and len(files) > limit:
        idx = np.random.default_rng(seed).choice(len(files), limit, replace=False)
        files = [files[i] for i in sorted(idx)]
    return [downscale(Image.open(f)) for f in files]


def negatives_pool(kind: str, *, shared: Path, coil: Path, comp: Path, ds: InstanceDataset,
                   instance: str) -> tuple[list[Image.Image], str, str]:
    """(images, negatives_source for the rows, description). Only ``in_pool`` leaks."""
    if kind == "dreambooth":  # external for COIL: other objects, real photos
        return _cached(kind, lambda: folder_images(shared / "dreambooth")), "external", \
            "DreamBooth photos (154, 29 objects): external to the COIL pool"
    if kind == "heldout":  # composite negatives/: held-out COIL objects on training backgrounds
        return _cached(kind, lambda: folder_images(comp / "negatives")), "external", \
            "held-out COIL objects (never evaluated, never distractors) on training backgrounds"
    if kind == "dreambooth+heldout":
        imgs = (_cached("dreambooth", lambda: folder_images(shared / "dreambooth"))
                + _cached("heldout", lambda: folder_images(comp / "negatives")))
        return imgs, "external", "DreamBooth photos + held-out COIL objects on training backgrounds"
    if kind == "coil+backgrounds":  # external for DreamBooth
        def load():
            views = [downscale(Image.open(p)) for p in sorted(glob.glob(str(shared / "coil100_subset" / "*" / "*.png")))[::6]]
            return views + folder_images(shared / "backgrounds")
        return _cached(kind, load), "external", "COIL views (every 6th, 17 objects) + 40 background photos"
    if kind == "in_pool":  # LEAKY: the other evaluated instances' train photos
        imgs = [ds.read_image(p) for n in ds.names if n != instance for p in ds.instances[n].train]
        return imgs, "in_pool", "LEAKY: other evaluated instances' train photos (in the eval pool)"
    raise SystemExit(f"unknown negatives pool {kind!r}")


_CACHE: dict[str, list[Image.Image]] = {}


def _cached(key: str, fn) -> list[Image.Image]:
    if key not in _CACHE:
        _CACHE[key] = fn()
    return _CACHE[key]


def auto_masks(settings, images: list[Image.Image], provided: list[np.ndarray] | None) -> tuple[list[Image.Image], dict]:
    """Masks predicted by ``segmentation.*`` (GrabCut by default); IoU vs provided ones when they exist."""
    t0 = time.perf_counter()
    out = get_segmenter(settings.segmentation.segmenter, settings.segmentation).segment(images)
    info = {"mask_s": round(time.perf_counter() - t0, 2),
            "mask_confidence": [round(o.confidence, 3) for o in out]}
    if provided is not None:
        info["mask_iou_vs_provided"] = [round(mask_iou(o.mask, g), 3) for o, g in zip(out, provided)]
    return [o.image() for o in out], info


def cut_paste_positives(settings, ds: InstanceDataset, name: str, data_root: Path, n: int,
                        scratch: Path, masks_from: str = "provided") -> tuple[list[Image.Image], dict]:
    inst = ds.instances[name]
    images = [ds.read_image(p) for p in inst.train]
    provided = [ds.read_mask(p) for p in inst.train] if all(p in ds.masks for p in inst.train) else None
    info: dict = {}
    if masks_from == "auto":  # what a user with 3 plain photos gets: no annotation at all
        masks, info = auto_masks(settings, images, provided)
    else:
        masks = [Image.fromarray(m.astype(np.uint8) * 255) for m in provided]
    data = InstanceData(name, inst.category, images, masks)
    gen = CutPasteGenerator.from_settings(settings, data_root=str(data_root))
    gen.load(gen.prepare(data, scratch))
    rows = [SampleRow(name, "positive", "cut_paste", "", 0.0,
                      stable_seed("pos", "cut_paste", name, settings.synthesis.seed, i), "template", i)
            for i in range(n)]
    return [s.image for s in gen.sample(rows)], info


# -- one data set ------------------------------------------------------------------------------
def run_dataset(label: str, ds_path: Path, instances: list[str], configs: list[tuple[str, str, str]],
                settings, args, shared: Path, coil: Path, comp: Path) -> tuple[list[dict], list[dict], dict]:
    """configs: (data_config, negatives kind, variant label). Returns (rows, runs, notes)."""
    ds = open_dataset(str(ds_path))
    pz, ev = settings.personalization, settings.evaluation
    bs = pz.backbones[0]
    evaluator = Evaluator(ds, ev, cache_dir=args.work / "embedding-cache")  # pretrained pools reused
    rows: list[dict] = []
    runs: list[dict] = []
    t0 = time.perf_counter()
    pre = evaluator.evaluate_pretrained(bs, ds.names, {"dataset": label, "variant": "pretrained",
                                                      "data_config": "pretrained", "negatives": "-",
                                                      "leaky": False})
    rows += pre
    log(f"{label}: pretrained evaluated on {len(ds.names)} instances in {time.perf_counter() - t0:.0f} s")
    notes = {"pretrained_eval_s": time.perf_counter() - t0, "negatives": {}}
    for name in instances:
        for data_config, neg_kind, variant in configs:
            if variant.startswith("leaky") and name not in instances[: args.leaky_instances]:
                continue
            with tempfile.TemporaryDirectory(dir=args.work) as tmp:
                t1 = time.perf_counter()
                negatives, neg_source, neg_desc = negatives_pool(neg_kind, shared=shared, coil=coil,
                                                                 comp=comp, ds=ds, instance=name)
                notes["negatives"][neg_kind] = {"description": neg_desc, "count": len(negatives)}
                anchors = [ds.read_image(p) for p in ds.instances[name].train]
                masks_info: dict = {}
                if data_config in ("cut_paste", "cut_paste_auto"):  # auto: predicted masks
                    positives, masks_info = cut_paste_positives(
                        settings, ds, name, args.cut_paste_root or ds_path, pz.num_positives, Path(tmp),
                        "auto" if data_config == "cut_paste_auto" else "provided")
                else:
                    positives = list(anchors)  # real-only: the photos
                synth_s = time.perf_counter() - t1
                data = TrainingData(name, anchors, positives, negatives,
                                    "real" if data_config == "real_only" else "synthetic", neg_source)
                res = train_one_instance(pz, bs, data, Path(tmp) / "train")
                t2 = time.perf_counter()
                keys = {"dataset": label, "variant": variant, "data_config": data_config,
                        "negatives": neg_kind, "leaky": neg_source == "in_pool"}
                rows += evaluator.evaluate_adapter(bs, name, res.adapter_path, keys)
                eval_s = time.perf_counter() - t2
            m = res.metrics
            runs.append({"dataset": label, "instance": name, "variant": variant, "data_config": data_config,
                         "negatives": neg_kind, "leaky": neg_source == "in_pool", "steps": res.steps,
                         "synthesis_s": round(synth_s, 1), "train_s": round(res.seconds, 1),
                         "eval_s": round(eval_s, 1), "initial_loss": m["initial_loss"],
                         "final_loss": m["final_loss"], "final_triplet_accuracy": m["final_triplet_accuracy"],
                         **masks_info})
            r = runs[-1]
            log(f"{label} {name} {variant}: {res.steps} steps, train {r['train_s']} s, eval {r['eval_s']} s, "
                f"loss {m['initial_loss']:.3f} -> {m['final_loss']:.4f}")
    return rows, runs, notes


# -- summaries ---------------------------------------------------------------------------------
def summarise(frame: pd.DataFrame, runs: list[dict], tasks: list[tuple[str, str]]) -> dict[str, Any]:
    """Per dataset x variant x task: mean/std over the trained instances, per scene, paired deltas."""
    ok = frame[(frame.status == "ok")]
    out: dict[str, Any] = {}
    for dataset in sorted(ok.dataset.unique()):
        d = ok[ok.dataset == dataset]
        trained: dict[str, list[str]] = {}
        for r in runs:
            if r["dataset"] == dataset:
                trained.setdefault(r["variant"], [])
                if r["instance"] not in trained[r["variant"]]:
                    trained[r["variant"]].append(r["instance"])
        all_trained = sorted({i for v in trained.values() for i in v}) or sorted(d.instance.unique())
        variants = ["pretrained", *trained]
        res_ds: dict[str, Any] = {"instances": all_trained, "variants": {}}
        for variant in variants:
            insts = trained.get(variant, all_trained)
            v = d[(d.variant == variant) & d.instance.isin(insts)]
            entry: dict[str, Any] = {"n_instances": len(insts), "instances": insts,
                                     "leaky": bool(v.leaky.any()) if len(v) else False, "tasks": {}}
            for task, metric in tasks:
                t = v[(v.task == task) & (v.metric == metric)]
                if t.empty:
                    continue
                allscene = t[t.scene == "all"].set_index("instance")["value"]
                te: dict[str, Any] = {"metric": metric, "mean": float(allscene.mean()),
                                      "std": float(allscene.std(ddof=1)) if len(allscene) > 1 else None,
                                      "n": int(allscene.notna().sum()),
                                      "per_instance": {k: float(x) for k, x in allscene.items()}}
                scenes = t[t.scene != "all"].groupby("scene")["value"]
                te["per_scene"] = {s: {"mean": float(g.mean()), "std": float(g.std(ddof=1)) if len(g) > 1 else None}
                                   for s, g in scenes}
                if variant != "pretrained":
                    p = d[(d.variant == "pretrained") & (d.task == task) & (d.metric == metric)
                          & (d.scene == "all")].set_index("instance")["value"].reindex(allscene.index)
                    delta = allscene - p
                    te["pretrained_same_instances"] = float(p.mean())
                    te["delta_vs_pretrained"] = {"mean": float(delta.mean()),
                                                 "std": float(delta.std(ddof=1)) if len(delta) > 1 else None,
                                                 "n_improved": int((delta > 0).sum()), "n": int(len(delta))}
                entry["tasks"][f"{task}.{metric}"] = te
            vr = [r for r in runs if r["dataset"] == dataset and r["variant"] == variant]
            if vr:
                entry["time_per_instance_s"] = {
                    "train": float(np.mean([r["train_s"] for r in vr])),
                    "synthesis": float(np.mean([r["synthesis_s"] for r in vr])),
                    "eval": float(np.mean([r["eval_s"] for r in vr])),
                    "total": float(np.mean([r["train_s"] + r["eval_s"] + r["synthesis_s"] for r in vr]))}
                if any("mask_confidence" in r for r in vr):
                    entry["auto_masks"] = {
                        "seconds_per_instance": float(np.mean([r["mask_s"] for r in vr])),
                        "confidence_mean": float(np.mean([c for r in vr for c in r["mask_confidence"]])),
                        "iou_vs_provided_mean": (float(np.mean([c for r in vr for c in r["mask_iou_vs_provided"]]))
                                                 if all("mask_iou_vs_provided" in r for r in vr) else None)}
                entry["loss"] = {"initial": float(np.mean([r["initial_loss"] for r in vr])),
                                 "final": float(np.mean([r["final_loss"] for r in vr]))}
            res_ds["variants"][variant] = entry
        # pretrained over every evaluated instance of the pool (context, not the paired baseline)
        pall = d[(d.variant == "pretrained") & (d.scene == "all")]
        res_ds["pretrained_all_instances"] = {
            f"{t}.{m}": {"mean": float(g.mean()), "std": float(g.std(ddof=1)), "n": int(g.count())}
            for (t, m), g in pall.groupby(["task", "metric"])["value"] if (t, m) in tasks}
        out[dataset] = res_ds
    return out


def add_leak_comparison(summary: dict[str, Any]) -> None:
    """For each LEAKY variant: the non-leaky variant with the same positives on the *same*
    instances, so the inflation reads as leaky minus honest, not leaky minus pretrained."""
    for res in summary.values():
        variants = res["variants"]
        for name, e in variants.items():
            if not e.get("leaky"):
                continue
            honest = next((v for v in ("cut_paste", "real_only") if v in name and v in variants), None)
            if honest is None:
                continue
            for key, te in e["tasks"].items():
                ref = variants[honest]["tasks"].get(key, {}).get("per_instance", {})
                pairs = [(te["per_instance"][i], ref[i]) for i in te["per_instance"] if i in ref]
                if pairs:
                    te["non_leaky_same_instances"] = {
                        "variant": honest, "mean": float(np.mean([b for _, b in pairs])),
                        "inflation": float(np.mean([a - b for a, b in pairs])), "n": len(pairs)}


def format_scenes(summary: dict[str, Any], tasks: list[tuple[str, str]]) -> str:
    lines = ["per scene (mean over the variant's instances):"]
    for dataset, res in summary.items():
        for task, metric in tasks:
            key = f"{task}.{metric}"
            scenes = sorted({s for e in res["variants"].values() for s in e["tasks"].get(key, {}).get("per_scene", {})})
            if not scenes:
                continue
            lines.append(f"  {dataset} {key:20s} " + " ".join(f"{s:>21s}" for s in scenes))
            for variant, e in res["variants"].items():
                ps = e["tasks"].get(key, {}).get("per_scene", {})
                lines.append(f"    {variant[:28]:28s}    " + " ".join(
                    f"{ps[s]['mean']:21.3f}" if s in ps else f"{'-':>21s}" for s in scenes))
    return "\n".join(lines)


def format_table(summary: dict[str, Any], tasks: list[tuple[str, str]]) -> str:
    lines = []
    cols = [f"{t}.{m}" for t, m in tasks]
    notes_after: list[str] = []
    head = f"{'dataset':10s} {'variant':28s} {'n':>3s} " + " ".join(f"{c:>26s}" for c in cols) + f" {'s/inst':>7s}"
    lines.append(head)
    lines.append("-" * len(head))
    for dataset, res in summary.items():
        for variant, e in res["variants"].items():
            cells = []
            for c in cols:
                te = e["tasks"].get(c)
                if te is None:
                    cells.append(f"{'-':>26s}")
                    continue
                std = f"{te['std']:.3f}" if te["std"] is not None else "nan"
                delta = te.get("delta_vs_pretrained")
                dtxt = f" ({delta['mean']:+.3f} {delta['n_improved']}/{delta['n']})" if delta else ""
                cells.append(f"{te['mean']:.3f}±{std}{dtxt}".rjust(26))
            label = variant + ("  [LEAKY]" if e.get("leaky") else "")
            if e.get("leaky"):
                infl = [f"{c} {te['non_leaky_same_instances']['inflation']:+.3f}" for c, te in e["tasks"].items()
                        if "non_leaky_same_instances" in te]
                if infl:
                    label_note = "inflation vs the honest variant on the same instances: " + ", ".join(infl)
                    notes_after.append(f"{dataset} {variant}: {label_note}")
            tpi = e.get("time_per_instance_s", {}).get("total")
            lines.append(f"{dataset:10s} {label:28s} {e['n_instances']:3d} " + " ".join(cells)
                         + (f" {tpi:7.0f}" if tpi else f" {'-':>7s}"))
        lines.append("")
    lines += notes_after
    lines.append("mean±std over instances (paired delta vs pretrained on the same instances, "
                 "instances improved / n); s/inst = synthesis + training + evaluation")
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available()}
    try:
        info["loadavg_at_end"] = os.getloadavg()
    except OSError:
        pass
    try:
        info["cpu_model"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                                 if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info


# -- main --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value", help="settings overrides")
    ap.add_argument("--config", default="offline-real")
    ap.add_argument("--work", default=os.environ.get("PERSREP_BENCH_WORK", "/tmp/persrep-bench"),
                    help="where data sets and scratch go (never the repo)")
    ap.add_argument("--coil-instances", type=int, default=6, help="COIL instances personalised (of 14)")
    ap.add_argument("--dreambooth-instances", type=int, default=4, help="DreamBooth instances (of 29; 0 = skip)")
    ap.add_argument("--leaky-instances", type=int, default=2,
                    help="COIL instances that also run the LEAKY in_pool variant (0 = skip)")
    ap.add_argument("--steps", type=int, default=None, help="personalization.max_steps (default: config)")
    ap.add_argument("--image-size", type=int, default=None,
                    help="backbone input size for training and evaluation (default: config, 224)")
    ap.add_argument("--test-per-instance", type=int, default=24, help="composite test images per instance")
    ap.add_argument("--dense", action="store_true", help="also detection/segmentation (slower)")
    ap.add_argument("--coil-negatives", default="dreambooth",
                    choices=["dreambooth", "heldout", "dreambooth+heldout"])
    ap.add_argument("--configs", default="real_only,cut_paste",
                    help="comma list of DATA_CONFIG[:NEGATIVES] (negatives default --coil-negatives), "
                         "e.g. real_only,cut_paste,cut_paste:dreambooth+heldout")
    ap.add_argument("--heldout-objects", type=int, default=3,
                    help="COIL objects held out as in-domain negatives (composite negatives/); "
                         "never evaluated, never distractors")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared, oversubscribed 2-core machine one thread "
                         "was 2-3x faster per step than two, measured; use 2 on an idle machine)")
    ap.add_argument("--dreambooth-configs", default="real_only",
                    help="comma list for DreamBooth (no masks): real_only, cut_paste_auto")
    ap.add_argument("--seed", type=int, default=0, help="instance selection and composite seed")
    ap.add_argument("--out", default=str(REPO / "bench" / "quality.json"))
    ap.add_argument("--record-as", default=None,
                    help="store this run under investigation[NAME] of --out, keeping the main result")
    ap.add_argument("--note", default="", help="free text stored with the run")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    overrides = list(args.overrides)
    if args.steps:
        overrides.append(f"personalization.max_steps={args.steps}")
    if args.image_size:
        overrides.append("personalization.backbones=[{name: tf_efficientnet_lite0, weights: offline, "
                         f"image_size: {args.image_size}}}]")
    tasks = ["classification", "retrieval"] + (["detection", "segmentation"] if args.dense else [])
    overrides.append(f"evaluation.tasks={json.dumps(tasks)}")
    # cut-and-paste reads the TRAINING half of the backgrounds, inside the composite data set
    overrides.append("generator.cut_paste.backgrounds=@data/backgrounds")
    settings = load_settings(args.config, overrides)
    args.work = Path(args.work)
    shared = shared_data_dir()
    neg_instances = args.heldout_objects
    cs = CompositeSettings(seed=args.seed, test_per_instance=args.test_per_instance,
                           dense_per_instance=4 if args.dense else 0, negative_instances=neg_instances)
    t0 = time.perf_counter()
    coil, comp, db = prepare_data(args.work, shared, cs)
    data_s = time.perf_counter() - t0
    comp_ds = open_dataset(str(comp))
    rng = np.random.default_rng(args.seed)
    coil_names = [comp_ds.names[i] for i in rng.permutation(len(comp_ds.names))][: args.coil_instances]
    configs = []
    for item in (c for c in args.configs.split(",") if c):
        dc, _, neg = item.partition(":")
        neg = neg or args.coil_negatives
        configs.append((dc, neg, dc if neg == args.coil_negatives else f"{dc}+neg={neg}"))
    if args.leaky_instances:
        configs.append(("cut_paste", "in_pool", "leaky_cut_paste_in_pool"))
    args.cut_paste_root = None
    rows, runs, notes = run_dataset("coil", comp, coil_names, configs, settings, args, shared, coil, comp)
    if args.dreambooth_instances:
        db_ds = open_dataset(str(db))
        db_names = [db_ds.names[i] for i in np.random.default_rng(args.seed).permutation(len(db_ds.names))][
            : args.dreambooth_instances]
        # cut_paste_auto pastes on the composite's training backgrounds (DreamBooth has none)
        r2, runs2, notes2 = run_dataset("dreambooth", db, db_names,
                                        [(c, "coil+backgrounds", c) for c in args.dreambooth_configs.split(",") if c],
                                        settings, argparse.Namespace(**{**vars(args), "leaky_instances": 0,
                                                                        "cut_paste_root": comp}),
                                        shared, coil, comp)
        rows, runs = rows + r2, runs + runs2
        notes = {"coil": notes, "dreambooth": notes2}
    else:
        notes = {"coil": notes}
    frame = results_frame(rows)
    head = [(t, m) for t, m in HEADLINE if t in tasks]
    summary = summarise(frame, runs, head)
    add_leak_comparison(summary)
    table = format_table(summary, head) + "\n\n" + format_scenes(summary, head)
    print(table)
    comp_info = json.loads((comp / "composite_info.json").read_text())["composite"]
    record = {
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "bench/quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "note": args.note,
        "wall_s": round(time.perf_counter() - t_start, 1), "data_prep_s": round(data_s, 1),
        "machine": machine_info(),
        "settings": {"config": args.config, "overrides": overrides,
                     "personalization": settings_to_dict(settings.personalization),
                     "evaluation": settings_to_dict(settings.evaluation),
                     "cut_paste": settings_to_dict(settings.generator.cut_paste),
                     "synthesis_resolution": settings.synthesis.resolution,
                     "composite": cs.as_json(), "coil_instances": coil_names,
                     "coil_negatives": args.coil_negatives},
        "data": {"coil_composite": {"instances_in_pool": len(comp_ds.names),
                                    "test_images": comp_info["counts"]["test"],
                                    "distractor_instances": comp_info["distractor_instances"],
                                    "negative_instances": comp_info["negative_instances"],
                                    "backgrounds_train": comp_info["backgrounds_train"],
                                    "backgrounds_test": comp_info["backgrounds_test"]},
                 "negatives": notes},
        "summary": summary, "runs": runs, "table": table.splitlines(),
    }
    out = Path(args.out)
    existing = json.loads(out.read_text()) if out.is_file() else {}
    if args.record_as:
        existing.setdefault("investigation", {})[args.record_as] = record
        doc = existing
    else:
        doc = {**record, "investigation": existing.get("investigation", {})}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.partial")
    tmp.write_text(json.dumps(doc, indent=1, default=float) + "\n")
    os.replace(tmp, out)
    log(f"wrote {out} ({'investigation.' + args.record_as if args.record_as else 'main result'}); "
        f"wall {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
