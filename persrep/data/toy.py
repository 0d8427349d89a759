"""The toy world: a deterministic procedural data set in the reference layout (the default).

Objects come from :mod:`persrep.data.toy_objects`: instances of a category differ only in fine
detail, so telling them apart takes instance-level features.
Test scenes follow PODS (``in_distribution``, ``pose``, ``distractors``, ``pose_and_distractors``)
over photographic (``skimage.data``, shipped offline) and procedural backgrounds; ``test_dense``
holds scenes with a large target (about half the frame) among 1-2 distractors. Distractors and negatives are fresh instances (same generator, other
seeds), never an evaluated instance, so no label is ever contradicted by an image's content.

Masks are exact: a sprite is drawn at ``ss`` times the resolution, box-downsampled, and its alpha
thresholded at 0.5; only those pixels are written (no blending), and a target pixel that would equal
what lies beneath is nudged by one level, so a mask is exactly the set of pixels the target changed
(after occlusion by objects drawn above it). ``ToyWorld.scene(...).render(with_target=False)``
renders the same scene without its target, which is how the tests check this.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from pydantic import ValidationError

from persrep.config import ToySettings
from persrep.data.toy_objects import CATEGORIES, Look, hsv, instance_look, render_sprite, seeded_rng

VERSION = "toy-2"  # toy-2: dense scenes with a larger target and 1-2 distractors
SCENES = ("in_distribution", "pose", "distractors", "pose_and_distractors")
_PHOTOS = ("coffee", "rocket", "coins", "brick", "grass", "gravel", "moon", "hubble_deep_field",
           "immunohistochemistry", "text", "page")  # bundled with scikit-image: no download
_N_BACKGROUNDS = 12
_NEGATIVE_KEY, _CLUTTER_KEY, _CLUTTER_POOL = 10_000, 20_000, 6  # evaluated keys are < 50
_CLUTTER = {"distractors": (1, 3), "pose_and_distractors": (1, 3), "dense": (1, 2)}  # objects
# A dense scene's target spans ~half the frame (sprite scale 0.5-0.7) among 1-2 distractors: at the
# demo's 96-256 px a CNN's stride-32 map then has a few cells on the object. With toy-1's scale
# 0.3-0.5 and 3-5 distractors every model scored detection mAP ~0.1 (measured: docs/DESIGN.md).
_DENSE_SCALE = (0.5, 0.7)
_STREAM = dict(train=0, test=1, test_dense=2, negatives=3, backgrounds=4, split=6)  # 5: looks


class ToyDatasetError(ValueError):
    """The destination cannot hold this toy data set (other parameters, foreign content)."""


# ---------------------------------------------------------------------------------------------
# backgrounds
@functools.cache
def _photos() -> tuple[tuple[np.ndarray, bool], ...]:
    """(RGB photograph, was grey) for each bundled photograph."""
    import skimage.data  # deferred: only scene backgrounds need it

    out = []
    for name in _PHOTOS:
        image = np.asarray(getattr(skimage.data, name)())
        grey = image.ndim == 2
        out.append((np.repeat(image[..., None], 3, -1) if grey else image[..., :3], grey))
    return tuple(out)


def plain_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A light, nearly uniform backdrop with a faint vertical gradient (the training photos)."""
    top = np.array(hsv(rng.random(), rng.uniform(0.02, 0.12), rng.uniform(0.88, 0.97)), np.float32)
    ramp = np.linspace(1.0, rng.uniform(0.9, 0.97), size, dtype=np.float32)
    column = np.clip(top[None, :] * ramp[:, None], 0, 255).astype(np.uint8)
    return np.repeat(column[:, None, :], size, axis=1)


def scene_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random crop of a photograph (about two thirds of the time) or a procedural texture."""
    kind = rng.random()
    if kind < 0.65:
        photo, grey = _photos()[rng.integers(len(_photos()))]
        h, w = photo.shape[:2]
        side = int(rng.uniform(0.3, 0.9) * min(h, w))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = Image.fromarray(np.ascontiguousarray(photo[y:y + side, x:x + side]))
        out = np.asarray(crop.resize((size, size), Image.BILINEAR, reducing_gap=2.0), np.float32)
        # tint grey photographs so that they are not all grey; vary the exposure of the others
        gain = rng.uniform(0.75, 1.1, 3) if grey else rng.uniform(0.85, 1.1)
        return np.clip(out * gain, 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = np.array(hsv(rng.random(), rng.uniform(0.1, 0.5), rng.uniform(0.4, 0.85)), np.float32)
    if kind < 0.77:  # wood-like grain
        wave = rng.uniform(6, 14) * yy + 0.6 * np.sin(3 * xx + rng.random() * 6)
        out = base * (0.85 + 0.15 * np.sin(2 * np.pi * wave))[..., None]
    elif kind < 0.89:  # tiles with grout
        n = int(rng.integers(3, 7))
        tiles = rng.uniform(0.8, 1.15, (n, n, 1)) * base
        out = tiles[(yy * n).astype(int), (xx * n).astype(int)]
        grout = (np.minimum((yy * n) % 1, (xx * n) % 1) < 0.06)[..., None]
        out = np.where(grout, 0.5 * base, out)
    else:  # smooth colour blobs
        low = Image.fromarray((rng.random((4, 4, 3)) * 255).astype(np.uint8))
        out = 0.6 * base + 0.4 * np.asarray(low.resize((size, size), Image.BICUBIC), np.float32)
    out = out + rng.normal(0, 4, out.shape)  # a little sensor-like noise
    return np.clip(out, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# scenes
@dataclass
class Scene:
    """A background and object layers (bottom to top); ``target`` indexes the evaluated object."""

    background: np.ndarray
    layers: list[tuple[np.ndarray, np.ndarray]]  # (rgb uint8 HxWx3, mask bool HxW)
    target: int

    def render(self, with_target: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(image, target mask). Without the target, the mask is empty and nothing else changes."""
        image, mask = self.background.copy(), np.zeros(self.background.shape[:2], bool)
        for index, (rgb, layer_mask) in enumerate(self.layers):
            if index == self.target:
                if not with_target:
                    continue
                rgb = rgb.copy()  # nudge pixels equal to what lies beneath, so each one changes
                rgb[layer_mask & (rgb == image).all(-1), 0] ^= 1
                mask = layer_mask.copy()
            else:
                mask &= ~layer_mask
            image[layer_mask] = rgb[layer_mask]
        return image, mask

    def visible_fraction(self) -> float:
        full = self.layers[self.target][1]
        above = np.zeros_like(full)
        for _, layer_mask in self.layers[self.target + 1:]:
            above |= layer_mask
        return float((full & ~above).sum() / max(1, full.sum()))


def _perspective_coefficients(dst: np.ndarray, src: np.ndarray) -> list[float]:
    """PIL's 8 PERSPECTIVE coefficients mapping output points ``dst`` to sprite points ``src``."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(dst, src):
        rows += [[x, y, 1, 0, 0, 0, -u * x, -u * y], [0, 0, 0, x, y, 1, -v * x, -v * y]]
        rhs += [u, v]
    return np.linalg.solve(np.array(rows, float), np.array(rhs, float)).tolist()


def place_object(look: Look, rng: np.random.Generator, size: int, scale: tuple[float, float],
                 posed: bool, centred: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Render ``look`` into a ``size`` square layer: (rgb, mask) with mask = alpha >= 0.5."""
    ss = max(1, min(4, 1024 // size))  # supersampling factor for antialiased edges
    sprite = render_sprite(look, int(0.75 * ss * size))
    side = rng.uniform(*scale) * size
    half = side / 2
    corners = np.array([[-half, -half], [half, -half], [half, half], [-half, half]])
    if posed:  # strong rotation, perspective, flip (the PODS "pose" shift)
        corners = corners + rng.uniform(-0.16, 0.16, (4, 2)) * side
        angle = rng.uniform(25, 80) * rng.choice([-1, 1]) + (180 if rng.random() < 0.2 else 0)
        if rng.random() < 0.5:
            corners[:, 0] *= -1
    else:
        angle = rng.uniform(-4, 4) if centred else rng.uniform(-10, 10)
    theta = np.deg2rad(angle)
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    slack = 0.03 * size if centred else max(0.0, size / 2 - 0.45 * side)
    centre = size / 2 + rng.uniform(-slack, slack, 2)
    dst = (corners @ rotation.T + centre) * ss
    src = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], float) * sprite.width
    layer = sprite.transform((size * ss, size * ss), Image.PERSPECTIVE,
                             _perspective_coefficients(dst, src), Image.BILINEAR)
    pixels = np.asarray(layer.reduce(ss).convert("RGBA") if ss > 1 else layer.convert("RGBA"))
    return np.ascontiguousarray(pixels[..., :3]), pixels[..., 3] >= 128


@dataclass(frozen=True)
class ToyImage:
    """One image of the data set: where it goes and how to rebuild its scene."""

    path: str
    mask_path: str
    stream: str  # train | test | test_dense | negatives
    category_index: int
    key: int  # instance key within the category (negatives: a fresh key)
    scene: str  # train | SCENES | dense
    index: int


@dataclass(frozen=True)
class ToyWorld:
    """The data set's parameters (the fields of ``ToySettings``) and every image it holds."""

    seed: int = 0
    categories: int = 4
    instances_per_category: int = 5
    image_size: int = 128
    train_per_instance: int = 3
    test_per_scene: int = 3
    dense_per_instance: int = 2
    negatives_per_category: int = 20

    def instance_names(self) -> list[str]:
        return sorted(f"{CATEGORIES[c]}_{k}" for c in range(self.categories)
                      for k in range(self.instances_per_category))

    def images(self) -> list[ToyImage]:
        out = []
        for c in range(self.categories):
            for k in range(self.instances_per_category):
                name = f"{CATEGORIES[c]}_{k}"
                out += [ToyImage(f"train/{name}/{i}.png", f"train_masks/{name}/{i}.png",
                                 "train", c, k, "train", i)
                        for i in range(self.train_per_instance)]
                out += [ToyImage(f"test/{name}/{s}_{i}.png", f"test_masks/{name}/{s}_{i}.png",
                                 "test", c, k, s, i)
                        for s in SCENES for i in range(self.test_per_scene)]
                out += [ToyImage(f"test_dense/{name}/{i}.png", f"test_dense_masks/{name}/{i}.png",
                                 "test_dense", c, k, "dense", i)
                        for i in range(self.dense_per_instance)]
            folder = f"{CATEGORIES[c]}_negatives"
            out += [ToyImage(f"negatives/{folder}/{j}.png", f"negatives_masks/{folder}/{j}.png",
                             "negatives", c, _NEGATIVE_KEY + j, SCENES[j % len(SCENES)], j)
                    for j in range(self.negatives_per_category)]
        return out

    def scene(self, image: ToyImage) -> Scene:
        scene_id = SCENES.index(image.scene) if image.scene in SCENES else len(SCENES)
        rng = seeded_rng(self.seed, _STREAM[image.stream], image.category_index, image.key,
                         scene_id, image.index)
        size, look = self.image_size, instance_look(self.seed, image.category_index, image.key)
        if image.scene == "train":  # sprite scale 0.64-0.72: the object spans ~50-60 % of the frame
            layer = place_object(look, rng, size, (0.64, 0.72), posed=False, centred=True)
            return Scene(plain_background(rng, size), [layer], 0)
        posed = image.scene in ("pose", "pose_and_distractors") or (
            image.scene == "dense" and rng.random() < 0.5)
        scale = _DENSE_SCALE if image.scene == "dense" else (0.4, 0.75)
        scene = Scene(scene_background(rng, size), [place_object(look, rng, size, scale, posed)], 0)
        clutter = _CLUTTER.get(image.scene)
        for _ in range(int(rng.integers(clutter[0], clutter[1] + 1)) if clutter else 0):
            self._add_distractor(scene, image.category_index, rng)
        return scene

    def _add_distractor(self, scene: Scene, category_index: int, rng: np.random.Generator) -> None:
        """Add one fresh object (a third of the time of the target's category) above or below the
        target, retrying placements that would hide more than half of the target."""
        c = category_index if rng.random() < 0.35 else int(rng.integers(len(CATEGORIES)))
        look = instance_look(self.seed, c, _CLUTTER_KEY + int(rng.integers(_CLUTTER_POOL)))
        for _ in range(8):
            layer = place_object(look, rng, self.image_size, (0.25, 0.5), posed=rng.random() < 0.5)
            below = rng.random() < 0.4
            layers = [layer, *scene.layers] if below else [*scene.layers, layer]
            trial = Scene(scene.background, layers, scene.target + 1 if below else scene.target)
            if trial.visible_fraction() >= 0.5:
                scene.layers, scene.target = trial.layers, trial.target
                return


# ---------------------------------------------------------------------------------------------
# writing
def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG", compress_level=6)  # no tIME chunk: reproducible


def _splits(world: ToyWorld) -> dict[str, str]:
    """~30 % of instances are "val", spread evenly over categories, the rest "test"."""
    rng = seeded_rng(world.seed, _STREAM["split"])
    orders = [rng.permutation(world.instances_per_category) for _ in range(world.categories)]
    interleaved = [f"{CATEGORIES[c]}_{orders[c][r]}" for r in range(world.instances_per_category)
                   for c in range(world.categories)]
    n_val = int(0.3 * len(interleaved) + 0.5)
    return {name: ("val" if rank < n_val else "test") for rank, name in enumerate(interleaved)}


def _info(world: ToyWorld, generator: dict) -> dict:
    classes = world.instance_names()
    splits = _splits(world)
    return {"classes": classes, "class_to_idx": {name: i for i, name in enumerate(classes)},
            "class_to_sc": {name: name.rsplit("_", 1)[0] for name in classes},
            "class_to_split": {name: splits[name] for name in classes},
            "image_to_scene": {im.path: im.scene for im in world.images() if im.stream == "test"},
            "generator": generator}


def _existing(dest: Path, generator: dict) -> bool:
    """True if ``dest`` already holds this exact data set; raise if it holds anything else."""
    if not dest.exists() or (dest.is_dir() and not any(dest.iterdir())):
        return False
    info_path = dest / "toy_info.json"
    if not info_path.is_file():
        raise ToyDatasetError(f"{dest} exists but is not a toy data set (no toy_info.json): "
                              "choose another destination or delete it")
    found = json.loads(info_path.read_text()).get("generator")
    if found != generator:
        raise ToyDatasetError(f"{dest} holds a toy data set made with other parameters "
                              f"({found}, wanted {generator}): delete it to regenerate, or "
                              "choose another destination")
    return True


def _publish(tmp: Path, dest: Path, generator: dict) -> None:
    """Rename the finished ``tmp`` to ``dest``; tolerate another process having published the
    same data set meanwhile (then ``tmp`` is removed by the caller)."""
    try:
        if dest.is_dir() and not any(dest.iterdir()):
            dest.rmdir()
        os.rename(tmp, dest)
    except OSError:
        if not _existing(dest, generator):
            raise


def write_toy_dataset(dest: str | Path, *, seed: int = 0, categories: int = 4,
                      instances_per_category: int = 5, image_size: int = 128,
                      train_per_instance: int = 3, test_per_scene: int = 3,
                      dense_per_instance: int = 2, negatives_per_category: int = 20,
                      progress: Callable[[str], None] | None = None) -> Path:
    """Generate the toy world into ``dest`` (built beside it, renamed into place when complete).

    Writes ``train/<instance>/<i>.png``, ``test/<instance>/<scene>_<i>.png``,
    ``test_dense/<instance>/<i>.png``, ``negatives/<category>_negatives/<j>.png`` (each with a
    ``*_masks/`` twin: mode "L", 0/255), ``backgrounds/<i>.png`` and ``toy_info.json``.
    Returns ``dest``; if it already holds the same data set, returns at once without writing;
    raises :class:`ToyDatasetError` if it holds anything else.
    """
    try:
        params = ToySettings(
            seed=seed, categories=categories, instances_per_category=instances_per_category,
            image_size=image_size, train_per_instance=train_per_instance,
            test_per_scene=test_per_scene, dense_per_instance=dense_per_instance,
            negatives_per_category=negatives_per_category).model_dump()
    except ValidationError as error:
        raise ToyDatasetError("toy world settings: " + "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())) from None
    dest, generator = Path(dest), {"version": VERSION, "params": params}
    if _existing(dest, generator):
        return dest
    world, say = ToyWorld(**params), progress or (lambda message: None)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        last_category = None
        for image in world.images():
            if image.category_index != last_category:
                last_category = image.category_index
                say(f"toy world: category {CATEGORIES[last_category]} "
                    f"({last_category + 1}/{world.categories})")
            pixels, mask = world.scene(image).render()
            _save_png(pixels, tmp / image.path)
            _save_png(mask.astype(np.uint8) * 255, tmp / image.mask_path)
        say(f"toy world: {_N_BACKGROUNDS} backgrounds")
        for i in range(_N_BACKGROUNDS):  # fresh samples of the scene backgrounds, not test ones
            _save_png(scene_background(seeded_rng(seed, _STREAM["backgrounds"], i), image_size),
                      tmp / "backgrounds" / f"{i}.png")
        info = json.dumps(_info(world, generator), indent=1, sort_keys=True)
        (tmp / "toy_info.json").write_text(info)  # written last: its presence means complete
        _publish(tmp, dest, generator)
    finally:  # after a successful rename there is nothing left here; after a failure, the debris
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"toy world: wrote {dest}")
    return dest


def write_toy_from_settings(dest: str | Path, toy_settings: ToySettings,
                            progress: Callable[[str], None] | None = None) -> Path:
    """``write_toy_dataset`` from a :class:`persrep.config.ToySettings`."""
    return write_toy_dataset(dest, **toy_settings.model_dump(), progress=progress)
