"""A harder evaluation set from an object collection with masks: PODS-style composited scenes.

``write_composite(SRC, BACKGROUNDS, DEST)`` reads a data set in the reference layout whose train
*and* test images have masks (e.g. COIL-100 imported with ``--train-indices 0,24,48 --masks ...``)
and writes a NEW data set in the reference layout:

- ``train/`` + ``train_masks/``: the same canonical photos, bytes unchanged (masks as 0/255 PNG);
- ``test/`` + ``test_masks/``: composited scenes. Each test view's masked object is pasted (its
  exact mask) onto a crop of a real background photo, in the four PODS scenes:

  ============================  ====================================================
  ``in_distribution``           a view near a train angle, moderate scale, small rotation
  ``pose``                      a view far from every train angle, stronger rotation
  ``distractors``               a near view plus 1-3 other objects pasted above/below it
  ``pose_and_distractors``      a far view plus 1-3 other objects
  ============================  ====================================================

  ``image_to_scene`` in the info file maps each test image to its scene. The number of test
  images per instance is capped (``test_per_instance``, split evenly over the scenes);
- ``test_dense/`` + ``test_dense_masks/`` (optional, ``dense_per_instance``): cluttered scenes,
  small target, 2-4 distractors;
- ``backgrounds/``: the *training* half of the background photos (bytes unchanged). The photos
  are split into two disjoint halves by a seeded permutation: test scenes are composed only on
  the other half, so cut-and-paste training (``generator.cut_paste.backgrounds=@data/backgrounds``)
  never sees a test background. Both lists are recorded in the info file;
- ``negatives/<category>_negatives/`` (optional, ``negative_instances``): held-out objects (never
  evaluated, never distractors) pasted on *training* backgrounds: in-domain negatives that are not
  evaluation instances (``personalization.external_negatives=@data/negatives``).

Poses. Views are taken to be equally spaced around a turntable in natural file-name order (COIL:
``n.png`` is 5*n degrees): view i of N is at 360*i/N degrees. A view's *pose distance* is the
circular distance to the nearest train view. ``near_degrees`` and ``far_degrees`` bound the
in-distribution and pose candidates (COIL with train views 0/120/240 degrees: near = 5-20 degrees
away, 24 candidates; far = 40-60 degrees, 27 candidates). With ``pose_order="none"`` (a collection
whose file order is not a turntable) every test view is a candidate for every scene.

Distractors are *held-out* objects of the collection (``distractor_instances``: a count picked by
seed, or names), removed from the output, so no test image shows an evaluated instance other than
its own label (a distractor that is itself evaluated would make a negative image contain a
positive). Each distractor goes above or below the target; a placement that would leave less than
``min_visible`` of the target visible is redrawn. The target's mask is its pasted mask minus the
pixels of every layer above it, i.e. exactly the pixels where it is visible.

Compositing reuses :mod:`persrep.generation.cut_paste` (``cut_out``, ``transform_foreground``,
``composite``): outside a layer's mask the image is untouched; with ``edge_blur > 0`` the mask's
inner rim is blended (foreground weight >= 0.5), so layer masks stay exact. Images are PNG.

Deterministic: every scene is drawn from ``np.random.default_rng`` seeded by
``stable_seed(seed, instance, split, index)``; the same inputs and settings give byte-identical
files. The data set is built in a temporary directory beside DEST and renamed into place; if DEST
already holds a composite made with the same inputs and settings it is returned unchanged.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from persrep.data.layout import (SCENES, DatasetError, InstanceDataset, decode_image,
                                 is_image_name, natural_key, open_dataset)
from persrep.hashing import stable_seed
from persrep.compositing import Placement, composite, cut_out, transform_foreground

VERSION = "composite-1"
INFO_NAME = "composite_info.json"
BACKGROUNDS_DIR = "backgrounds"
NEGATIVES_DIR = "negatives"
_CROP_FRACTION = (0.5, 1.0)  # background crop side, as a fraction of the photo's shorter side
_MAX_TRIES = 12  # placements tried per distractor before it is dropped


@dataclass(frozen=True)
class CompositeSettings:
    """How the composite data set is drawn (every field is recorded in the info file)."""

    seed: int = 0
    size: int = 224  # side of the composited (square) images, px
    test_per_instance: int = 24  # cap, split evenly over the four scenes
    dense_per_instance: int = 0  # test_dense scenes per instance (0 = no test_dense split)
    pose_order: str = "circular"  # circular (turntable file order) | none
    near_degrees: float = 20.0  # in_distribution / distractors: views at most this far
    far_degrees: float = 40.0  # pose / pose_and_distractors: views at least this far
    scale_in_distribution: tuple[float, float] = (0.45, 0.65)  # object's longer side / canvas
    scale_pose: tuple[float, float] = (0.35, 0.65)
    scale_target_with_distractors: tuple[float, float] = (0.35, 0.55)
    scale_distractor: tuple[float, float] = (0.3, 0.5)
    scale_dense_target: tuple[float, float] = (0.25, 0.45)
    rotation_in_distribution: float = 10.0  # degrees, uniform +-
    rotation_pose: float = 30.0
    flip: bool = True
    distractors: tuple[int, int] = (1, 3)  # per distractor scene (inclusive)
    dense_distractors: tuple[int, int] = (2, 4)
    min_visible: float = 0.5  # target fraction that must stay visible
    edge_blur: float = 1.0
    distractor_instances: int | tuple[str, ...] = 3  # held out: only ever pasted as distractors
    negative_instances: int | tuple[str, ...] = 0  # held out: only ever written as negatives
    negatives_per_instance: int = 24
    test_background_fraction: float = 0.5  # share of background photos kept for test scenes

    def __post_init__(self):
        problems = []
        if self.size < 32:
            problems.append(f"size={self.size}: need >= 32")
        if self.test_per_instance < 1:
            problems.append(f"test_per_instance={self.test_per_instance}: need >= 1")
        if self.dense_per_instance < 0 or self.negatives_per_instance < 0:
            problems.append("dense_per_instance / negatives_per_instance must be >= 0")
        if self.pose_order not in ("circular", "none"):
            problems.append(f"pose_order={self.pose_order!r}: choose circular or none")
        if not 0 <= self.near_degrees <= 180 or not 0 <= self.far_degrees <= 180:
            problems.append("near_degrees / far_degrees must be in [0, 180]")
        for name in ("scale_in_distribution", "scale_pose", "scale_target_with_distractors",
                     "scale_distractor", "scale_dense_target"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi <= 1:
                problems.append(f"{name}={[lo, hi]}: need 0 < min <= max <= 1 (objects stay inside)")
        for name in ("distractors", "dense_distractors"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                problems.append(f"{name}={[lo, hi]}: need 0 <= min <= max")
        if not 0 < self.min_visible <= 1:
            problems.append(f"min_visible={self.min_visible}: need 0 < v <= 1")
        if not 0 < self.test_background_fraction < 1:
            problems.append(f"test_background_fraction={self.test_background_fraction}: need 0 < f < 1")
        if problems:
            raise DatasetError("composite settings: " + "; ".join(problems))

    def as_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


@dataclass
class CompositeResult:
    dest: Path
    instances: list[str]
    train_images: int
    test_images: int
    dense_images: int
    negatives: int
    distractor_instances: list[str]
    negative_instances: list[str]
    backgrounds_train: list[str]
    backgrounds_test: list[str]
    seconds: float
    reused: bool = False
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# scene plans (pure data) and rendering
@dataclass(frozen=True)
class Layer:
    instance: str
    view: str  # image rel path in the source data set
    placement: Placement


@dataclass(frozen=True)
class ScenePlan:
    """Everything needed to render one scene: a background crop and layers bottom to top."""

    background: str  # file name in the backgrounds folder
    crop: tuple[float, float, float, float]  # box in the photo (x0, y0, x1, y1)
    layers: tuple[Layer, ...]
    target: int  # index of the target layer (-1: no target, e.g. a negatives image)
    scene: str

    def describe(self) -> dict[str, Any]:
        t = self.layers[self.target] if self.target >= 0 else None
        return {"scene": self.scene, "background": self.background,
                "view": t.view if t else None,
                "distractors": [ly.view for i, ly in enumerate(self.layers) if i != self.target]}


class _Sources:
    """Decoded cut-outs of the source views and background photos (cached)."""

    def __init__(self, ds: InstanceDataset, backgrounds: Path):
        self.ds, self.backgrounds = ds, backgrounds
        self._cutouts: dict[str, Image.Image] = {}
        self._photos: dict[str, Image.Image] = {}

    def cutout(self, rel: str) -> Image.Image:
        if rel not in self._cutouts:
            mask = self.ds.read_mask(rel)
            if mask is None:
                raise DatasetError(f"{self.ds.root}/{rel}: no mask; composites need masks for every "
                                   "train and test image (import with --masks)")
            image = self.ds.read_image(rel)
            if mask.shape != (image.height, image.width):
                mask = np.asarray(Image.fromarray(mask).resize(image.size, Image.Resampling.NEAREST))
            self._cutouts[rel] = cut_out(image, Image.fromarray((mask * 255).astype(np.uint8)),
                                         f"{self.ds.root}/{rel}")
        return self._cutouts[rel]

    def photo(self, name: str) -> Image.Image:
        if name not in self._photos:
            path = self.backgrounds / name
            self._photos[name] = decode_image(path.read_bytes(), str(path))
        return self._photos[name]


def render_scene(plan: ScenePlan, sources: _Sources, size: int, edge_blur: float,
                 with_target: bool = True) -> tuple[Image.Image, np.ndarray, float]:
    """(image, target's visible mask, visible fraction). ``with_target=False`` renders the same
    scene without the target (the mask is then empty): the two differ only inside the mask
    when ``edge_blur`` is 0."""
    photo = sources.photo(plan.background)
    image = photo.resize((size, size), Image.Resampling.BILINEAR, box=plan.crop)
    target_mask = np.zeros((size, size), bool)
    full = 0
    for i, layer in enumerate(plan.layers):
        if i == plan.target and not with_target:
            continue
        colour, solid = transform_foreground(sources.cutout(layer.view), layer.placement, size)
        image, mask_image = composite(image, colour, solid, layer.placement.x_fraction,
                                      layer.placement.y_fraction, edge_blur)
        mask = np.asarray(mask_image) > 0
        if i == plan.target:
            target_mask, full = mask.copy(), int(mask.sum())
        elif i > plan.target >= 0:
            target_mask &= ~mask
    visible = float(target_mask.sum() / full) if full else 0.0
    return image, target_mask, visible


def _placement(rng: np.random.Generator, scale: tuple[float, float], rotation: float,
               flip: bool) -> Placement:
    # every value drawn in a fixed order, whatever the settings
    s = float(rng.uniform(*scale))
    angle = float(rng.uniform(-rotation, rotation))
    f = bool(rng.random() < 0.5) and flip
    x, y = (float(v) for v in rng.random(2))
    return Placement(0, s, angle, f, x, y)


def _footprint(sources: _Sources, layer: Layer, size: int) -> np.ndarray:
    colour, solid = transform_foreground(sources.cutout(layer.view), layer.placement, size)
    mask = np.zeros((size, size), bool)
    h, w = solid.shape
    x0 = round(layer.placement.x_fraction * (size - w))
    y0 = round(layer.placement.y_fraction * (size - h))
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x0 + w, size), min(y0 + h, size)
    mask[cy0:cy1, cx0:cx1] = solid[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
    return mask


# ---------------------------------------------------------------------------------------------
# planning
def circular_distance(a: float, b: float) -> float:
    d = abs(a - b) % 360.0
    return min(d, 360.0 - d)


def pose_distances(ds: InstanceDataset, name: str) -> dict[str, float]:
    """Degrees from each test view of ``name`` to its nearest train view (turntable order)."""
    inst = ds.instances[name]
    views = sorted(inst.train + inst.test, key=lambda r: natural_key(r.rsplit("/", 1)[-1]))
    step = 360.0 / len(views)
    angle = {rel: i * step for i, rel in enumerate(views)}
    return {rel: min(circular_distance(angle[rel], angle[t]) for t in inst.train) for rel in inst.test}


def _scene_counts(total: int) -> dict[str, int]:
    base, extra = divmod(total, len(SCENES))
    return {s: base + (1 if i < extra else 0) for i, s in enumerate(SCENES)}


def _pick_held_out(names: list[str], spec: int | tuple[str, ...], seed: int, salt: str,
                   exclude: set[str]) -> list[str]:
    pool = [n for n in names if n not in exclude]
    if isinstance(spec, int):
        if spec < 0 or spec >= len(pool):
            raise DatasetError(f"{salt}={spec}: need 0 <= count < {len(pool)} (instances left to evaluate)")
        order = np.random.default_rng(stable_seed(seed, salt)).permutation(len(pool))
        return sorted(pool[i] for i in order[:spec])
    unknown = sorted(set(spec) - set(pool))
    if unknown:
        raise DatasetError(f"{salt}: unknown or already held-out instance(s) {unknown}")
    return sorted(spec)


def split_backgrounds(files: list[str], seed: int, test_fraction: float = 0.5) -> tuple[list[str], list[str]]:
    """(train half, test half): a seeded permutation of the sorted names; disjoint, both non-empty."""
    files = sorted(files)
    if len(files) < 2:
        raise DatasetError(f"need at least 2 background photos to split into train/test halves, got {len(files)}")
    order = np.random.default_rng(stable_seed(seed, "backgrounds")).permutation(len(files))
    n_test = min(len(files) - 1, max(1, round(test_fraction * len(files))))
    test = sorted(files[i] for i in order[:n_test])
    train = sorted(files[i] for i in order[n_test:])
    return train, test


class _Planner:
    def __init__(self, ds: InstanceDataset, sources: _Sources, cs: CompositeSettings,
                 test_backgrounds: list[str], train_backgrounds: list[str], distractors: list[str]):
        self.ds, self.sources, self.cs = ds, sources, cs
        self.test_backgrounds, self.train_backgrounds = test_backgrounds, train_backgrounds
        self.distractor_views = [rel for n in distractors
                                 for rel in ds.instances[n].train + ds.instances[n].test]

    def _background(self, rng: np.random.Generator, pool: list[str]) -> tuple[str, tuple[float, ...]]:
        name = pool[int(rng.integers(len(pool)))]
        w, h = self.sources.photo(name).size
        side = float(rng.uniform(*_CROP_FRACTION)) * min(w, h)
        x0, y0 = float(rng.uniform(0, w - side)), float(rng.uniform(0, h - side))
        return name, (x0, y0, x0 + side, y0 + side)

    def scene(self, rng: np.random.Generator, name: str, view: str, scene: str) -> ScenePlan:
        cs = self.cs
        background, crop = self._background(rng, self.test_backgrounds)
        posed = scene in ("pose", "pose_and_distractors")
        rotation = cs.rotation_pose if posed else cs.rotation_in_distribution
        if scene == "dense":
            scale, n_range = cs.scale_dense_target, cs.dense_distractors
        elif scene in ("distractors", "pose_and_distractors"):
            scale, n_range = cs.scale_target_with_distractors, cs.distractors
        else:
            scale, n_range = (cs.scale_pose if posed else cs.scale_in_distribution), (0, 0)
        layers = [Layer(name, view, _placement(rng, scale, rotation, cs.flip))]
        target = 0
        wanted = int(rng.integers(n_range[0], n_range[1] + 1))
        if wanted and not self.distractor_views:
            raise DatasetError("distractor scenes need held-out distractor objects: set "
                               "distractor_instances >= 1")
        for _ in range(wanted):
            layers, target = self._add_distractor(rng, layers, target)
        return ScenePlan(background, crop, tuple(layers), target, scene)

    def _add_distractor(self, rng, layers: list[Layer], target: int) -> tuple[list[Layer], int]:
        size = self.cs.size
        full = _footprint(self.sources, layers[target], size)
        above_now = np.zeros_like(full)
        for ly in layers[target + 1:]:
            above_now |= _footprint(self.sources, ly, size)
        for _ in range(_MAX_TRIES):
            view = self.distractor_views[int(rng.integers(len(self.distractor_views)))]
            layer = Layer("distractor", view, _placement(rng, self.cs.scale_distractor,
                                                         self.cs.rotation_pose, self.cs.flip))
            if rng.random() < 0.5:  # below the target: never hides it
                return [layer, *layers], target + 1
            cover = above_now | _footprint(self.sources, layer, size)
            if (full & ~cover).sum() >= self.cs.min_visible * full.sum():
                return [*layers, layer], target
        return layers, target  # every try hid too much: the scene keeps fewer distractors

    def negative(self, rng: np.random.Generator, view: str) -> ScenePlan:
        background, crop = self._background(rng, self.train_backgrounds)
        layer = Layer("negative", view, _placement(rng, self.cs.scale_pose, self.cs.rotation_pose,
                                                   self.cs.flip))
        return ScenePlan(background, crop, (layer,), -1, "negative")


def plan_composite(ds: InstanceDataset, backgrounds: str | Path,
                   cs: CompositeSettings = CompositeSettings()) -> dict[str, Any]:
    """Every file of the composite as a plan (no pixels written): used by :func:`write_composite`."""
    backgrounds = Path(backgrounds)
    if not backgrounds.is_dir():
        raise DatasetError(f"backgrounds {backgrounds}: not a directory of photos")
    files = sorted(f.name for f in backgrounds.iterdir() if f.is_file() and is_image_name(f.name))
    bg_train, bg_test = split_backgrounds(files, cs.seed, cs.test_background_fraction)
    names = ds.names
    distractors = _pick_held_out(names, cs.distractor_instances, cs.seed, "distractor_instances", set())
    negatives = _pick_held_out(names, cs.negative_instances, cs.seed, "negative_instances", set(distractors))
    evaluated = [n for n in names if n not in distractors and n not in negatives]
    if len(evaluated) < 2:
        raise DatasetError(f"only {len(evaluated)} instance(s) left to evaluate after holding out "
                           f"{len(distractors)} distractor and {len(negatives)} negative objects")
    missing = [rel for n in names for rel in ds.instances[n].train + ds.instances[n].test
               if rel not in ds.masks]
    if missing:
        raise DatasetError(f"{ds.root}: {len(missing)} train/test image(s) have no mask (first: "
                           f"{missing[0]}); composites need masks (import with --masks)")
    sources = _Sources(ds, backgrounds)
    planner = _Planner(ds, sources, cs, bg_test, bg_train, distractors)
    test: dict[str, ScenePlan] = {}
    dense: dict[str, ScenePlan] = {}
    for name in evaluated:
        inst = ds.instances[name]
        if not inst.test:
            raise DatasetError(f"{ds.root}: instance {name} has no test views to composite")
        if cs.pose_order == "circular":
            dist = pose_distances(ds, name)
            near = [r for r in inst.test if 0 < dist[r] <= cs.near_degrees] or list(inst.test)
            far = [r for r in inst.test if dist[r] >= cs.far_degrees] or list(inst.test)
        else:
            near = far = list(inst.test)
        rng = np.random.default_rng(stable_seed(cs.seed, name, "test"))
        for scene, count in _scene_counts(cs.test_per_instance).items():
            pool = far if scene in ("pose", "pose_and_distractors") else near
            views = [pool[i] for i in rng.choice(len(pool), count, replace=count > len(pool))]
            for k, view in enumerate(views):
                srng = np.random.default_rng(stable_seed(cs.seed, name, scene, k))
                stem = Path(view).stem
                test[f"test/{name}/{scene}_{k:02d}_v{stem}.png"] = planner.scene(srng, name, view, scene)
        for k in range(cs.dense_per_instance):
            srng = np.random.default_rng(stable_seed(cs.seed, name, "dense", k))
            view = inst.test[int(srng.integers(len(inst.test)))]
            dense[f"test_dense/{name}/{k:02d}_v{Path(view).stem}.png"] = planner.scene(srng, name, view, "dense")
    negs: dict[str, ScenePlan] = {}
    categories = sorted({ds.instances[n].category for n in evaluated})
    for cat in categories if negatives else []:
        own = [n for n in negatives if ds.instances[n].category == cat] or negatives
        for n in own:
            views = ds.instances[n].train + ds.instances[n].test
            for k in range(cs.negatives_per_instance):
                srng = np.random.default_rng(stable_seed(cs.seed, n, "negative", k))
                view = views[int(srng.integers(len(views)))]
                negs[f"{NEGATIVES_DIR}/{cat}_negatives/{n}_{k:02d}.png"] = planner.negative(srng, view)
    return {"evaluated": evaluated, "distractors": distractors, "negatives_instances": negatives,
            "bg_train": bg_train, "bg_test": bg_test, "test": test, "dense": dense,
            "negatives": negs, "sources": sources}


# ---------------------------------------------------------------------------------------------
# writing
def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)  # no tIME chunk: byte-reproducible
    return buf.getvalue()


def _mask_png(mask: np.ndarray) -> bytes:
    return _png_bytes(Image.fromarray(mask.astype(np.uint8) * 255, mode="L"))


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _identity(src_ds: InstanceDataset, backgrounds: Path, cs: CompositeSettings) -> dict[str, Any]:
    bg = sorted((f.name, f.stat().st_size) for f in backgrounds.iterdir()
                if f.is_file() and is_image_name(f.name))
    return json.loads(json.dumps({"version": VERSION, "source_listing": src_ds.listing_key,
                                  "backgrounds": bg, "settings": cs.as_json()}))


def write_composite(src: str | Path, backgrounds: str | Path, dest: str | Path,
                    settings: CompositeSettings | None = None, *, name: str = "composite",
                    progress: Callable[[str], None] | None = None) -> CompositeResult:
    """Write the composite data set to ``dest`` (see the module docstring). Atomic; idempotent."""
    cs = settings or CompositeSettings()
    t0 = time.perf_counter()
    src_ds = open_dataset(str(src))
    backgrounds, dest = Path(backgrounds), Path(dest)
    if not backgrounds.is_dir():
        raise DatasetError(f"backgrounds {backgrounds}: not a directory of photos")
    identity = _identity(src_ds, backgrounds, cs)
    info_path = dest / f"{name}_info.json"
    if dest.exists() and any(dest.iterdir()):
        found = json.loads(info_path.read_text()).get("composite", {}) if info_path.is_file() else {}
        if found.get("identity") == identity:
            return _result_from_info(dest, found, time.perf_counter() - t0)
        raise DatasetError(f"{dest} exists and is not this composite (other inputs or settings): "
                           "choose a new destination or delete it")
    plan = plan_composite(src_ds, backgrounds, cs)
    sources: _Sources = plan["sources"]
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        image_to_scene: dict[str, str] = {}
        details: dict[str, dict[str, Any]] = {}
        n_train = 0
        for n in plan["evaluated"]:
            for rel in src_ds.instances[n].train:
                _write(tmp / rel, src_ds.read_bytes(rel))
                mask = src_ds.read_mask(rel)
                _write(tmp / "train_masks" / n / (Path(rel).stem + ".png"), _mask_png(mask))
                n_train += 1
        for split, plans in (("test", plan["test"]), ("test_dense", plan["dense"])):
            for i, (rel, sp) in enumerate(plans.items()):
                image, mask, visible = render_scene(sp, sources, cs.size, cs.edge_blur)
                inst = rel.split("/")[1]
                _write(tmp / rel, _png_bytes(image))
                _write(tmp / f"{split}_masks" / inst / Path(rel).name, _mask_png(mask))
                details[rel] = {**sp.describe(), "visible": round(visible, 4)}
                if split == "test":
                    image_to_scene[rel] = sp.scene
                if progress and (i + 1) % 100 == 0:
                    progress(f"{split}: {i + 1}/{len(plans)} scenes")
        for rel, sp in plan["negatives"].items():
            image, _, _ = render_scene(sp, sources, cs.size, cs.edge_blur)
            _write(tmp / rel, _png_bytes(image))
        for f in plan["bg_train"]:
            _write(tmp / BACKGROUNDS_DIR / f, (backgrounds / f).read_bytes())
        src_info = {}
        if src_ds.info_file:
            src_info = json.loads(src_ds.read_bytes(src_ds.info_file))
        classes = plan["evaluated"]
        meta = {"identity": identity, "source": str(src), "backgrounds_source": str(backgrounds),
                "backgrounds_dir": BACKGROUNDS_DIR, "backgrounds_train": plan["bg_train"],
                "backgrounds_test": plan["bg_test"], "distractor_instances": plan["distractors"],
                "negative_instances": plan["negatives_instances"],
                "negatives_dir": NEGATIVES_DIR if plan["negatives"] else None,
                "counts": {"train": n_train, "test": len(plan["test"]), "test_dense": len(plan["dense"]),
                           "negatives": len(plan["negatives"])},
                "images": details}
        info = {"classes": classes, "class_to_idx": {n: i for i, n in enumerate(classes)},
                "class_to_sc": {n: src_ds.instances[n].category for n in classes},
                "image_to_scene": image_to_scene, "composite": meta}
        if src_info.get("class_to_split"):
            info["class_to_split"] = {n: src_info["class_to_split"][n] for n in classes
                                      if n in src_info["class_to_split"]}
        (tmp / f"{name}_info.json").write_text(json.dumps(info, indent=1, sort_keys=True))
        if dest.is_dir() and not any(dest.iterdir()):
            dest.rmdir()
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return _result_from_info(dest, meta, time.perf_counter() - t0, reused=False, classes=classes)


def _result_from_info(dest: Path, meta: dict[str, Any], seconds: float, reused: bool = True,
                      classes: list[str] | None = None) -> CompositeResult:
    if classes is None:
        info = json.loads(next(dest.glob("*_info.json")).read_text())
        classes = info["classes"]
    c = meta["counts"]
    return CompositeResult(dest, list(classes), c["train"], c["test"], c["test_dense"], c["negatives"],
                           meta["distractor_instances"], meta["negative_instances"],
                           meta["backgrounds_train"], meta["backgrounds_test"], seconds, reused)


# ---------------------------------------------------------------------------------------------
# command line (wired in persrep/cli.py as `persrep data composite`)
def cmd_data_composite(args: Any) -> int:
    """``persrep data composite SRC BACKGROUNDS DEST [options]``."""
    held = (lambda v: int(v) if str(v).isdigit() else tuple(s for s in str(v).split(",") if s))
    cs = CompositeSettings(seed=args.seed, size=args.size, test_per_instance=args.test_per_instance,
                           dense_per_instance=args.dense_per_instance,
                           distractor_instances=held(args.distractor_instances),
                           negative_instances=held(args.negative_instances),
                           negatives_per_instance=args.negatives_per_instance)
    res = write_composite(args.src, args.backgrounds, args.dest, cs,
                          progress=(lambda m: print(f"  {m}", flush=True)) if args.verbose else None)
    print(f"composite {'already present' if res.reused else 'written'} at {res.dest}: "
          f"{len(res.instances)} instances, {res.train_images} train, {res.test_images} test, "
          f"{res.dense_images} test_dense, {res.negatives} negatives; "
          f"{len(res.backgrounds_train)} training backgrounds in {res.dest / BACKGROUNDS_DIR}, "
          f"{len(res.backgrounds_test)} test backgrounds (disjoint); distractors: "
          f"{res.distractor_instances}; {res.seconds:.1f} s")
    return 0
