"""The ``cut_paste`` generator: the instance's masked photos pasted onto backgrounds.

Each positive is one real foreground (train image x train mask, cropped to the mask's box)
flipped, scaled, rotated and pasted at a random position onto a background, with the exact
pasted mask emitted beside it. No training; cheap enough for CPU machines.

Geometry, all drawn from ``np.random.default_rng(row.seed)`` (so a row regenerates alone):

- *scale* (``synthesis.cut_paste.scale_range``): the object's longer side, before rotation, as a
  fraction of the background's shorter side.
- *rotation*: uniform in ``±rotation_degrees``; *flip*: horizontal, probability 1/2 when ``flip``.
- *position*: uniform over the offsets that keep the object inside the canvas. With a scale near
  or above 1 the object can be larger than the canvas along an axis; then the offset is uniform
  over the positions where the object covers that axis (the object is cropped, the mask too).
- the foreground is photo ``row.index mod n`` (every photo used equally often).

Blending (edge_blur, in pixels = Gaussian sigma): the emitted mask is ``alpha >= 0.5`` of the
transformed foreground. Outside the mask the output equals the background byte for byte. Inside
it, the foreground weight is the Gaussian-blurred mask clipped to [0.5, 1]: 1 in the object's
interior (the photo's pixels exactly), fading to >= 0.5 on the mask's inner rim. So the mask is
exactly the set of changed pixels (wherever foreground and background differ by 2 or more), and
the seam is still softened. Resizing and rotation work on premultiplied alpha, so no dark fringe
leaks in from outside the object.

Backgrounds (``synthesis.cut_paste.backgrounds``): a folder of real photos (local or ``s3://``;
``@data/...`` is relative to the data set root, see :func:`resolve_data_path`), cropped at random
and resized to ``synthesis.resolution``; or ``generated``: the synthesis stage injects a
``background_source(seed, size) -> PIL.Image`` that draws from the base diffusion model
(:class:`BaseModelBackgrounds` adapts a base-model sampler, with :data:`BACKGROUND_PROMPTS`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from PIL import Image, ImageFilter

from persrep.generation.base import (Capabilities, InstanceData, SampledImage, SampleRow,
                                     register_generator)
from persrep.generation.real_only import RealPhotosGenerator

GENERATED = "generated"
DATA_PREFIX = "@data/"
ALPHA_THRESHOLD = 128  # mask = alpha >= 0.5 after resizing and rotation
MIN_INNER_WEIGHT = 0.5  # foreground weight on the mask's inner rim (keeps mask == changed pixels)
MIN_OBJECT_PX = 4  # a smaller paste is no longer recognisably the object
CROP_FRACTION = (0.6, 1.0)  # side of a background crop, as a fraction of the photo's shorter side

# Scenes for generated backgrounds: surfaces and places where everyday objects are photographed.
BACKGROUND_PROMPTS = (
    "a photo of a kitchen table", "an empty wooden desk", "a photo of a living room floor",
    "a photo of an empty office shelf", "a photo of a grassy lawn in a park",
    "a photo of a city sidewalk", "a photo of a white bed sheet", "a photo of a marble countertop",
    "a photo of an empty garden bench", "a photo of a carpet", "a photo of a sandy beach",
    "a photo of a concrete floor in a garage", "a photo of a cafe table", "a photo of a tiled bathroom floor",
    "a photo of a forest trail", "a photo of an empty car seat",
)


class BackgroundSource(Protocol):
    """``source(seed, size)`` -> an RGB background of ``size`` x ``size``, the same for the same seed.

    A source may also offer ``many(seeds, size) -> list[Image]`` to draw a batch at once (a
    diffusion model is much faster in batches); :class:`CutPasteGenerator` uses it when present.
    """

    def __call__(self, seed: int, size: int) -> Image.Image: ...


def background_prompt(seed: int) -> str:
    return BACKGROUND_PROMPTS[seed % len(BACKGROUND_PROMPTS)]


def resolve_data_path(path: str, data_root: str | None, setting: str = "synthesis.cut_paste.backgrounds") -> str:
    """``@data/x`` -> ``<data_root>/x`` (local or ``s3://``); any other path is returned unchanged."""
    if not path.startswith(DATA_PREFIX):
        return path
    if not data_root:
        raise ValueError(f"{setting}={path!r} is relative to the data set root, but no data root "
                         "is known: pass data_root (the data set directory or s3:// URI) to the "
                         "generator, or give a full folder path")
    return f"{data_root.rstrip('/')}/{path[len(DATA_PREFIX):].lstrip('/')}"


# ---------------------------------------------------------------------------------------------
# backgrounds
class FolderBackgrounds:
    """Random square crops of the photos in a folder (recursive), resized to the canvas size.

    ``seed`` picks the photo and the crop (side 60-100 % of the photo's shorter side). Files are
    listed once, sorted, so a seed means the same crop on every machine. Decoded photos are kept
    in a small LRU cache (a batch of rows draws from few photos many times).
    """

    def __init__(self, location: str, s3_endpoint: str | None = None, cache_size: int = 16):
        self.location = location
        self.s3_endpoint = s3_endpoint
        self.cache_size = cache_size
        self._files: list[str] | None = None
        self._cache: OrderedDict[str, Image.Image] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:  # ship to workers without decoded pixels
        return {**self.__dict__, "_cache": OrderedDict()}

    def _storage(self):
        from persrep.storage import Storage  # pyarrow: only when a folder is actually read

        return Storage(self.location, self.s3_endpoint)

    @property
    def files(self) -> list[str]:
        if self._files is None:
            from persrep.data.layout import is_image_name

            files = sorted(rel for rel, _ in self._storage().list_files("") if is_image_name(rel))
            if not files:
                raise ValueError(f"cut_paste backgrounds folder {self.location!r} is missing or has no images "
                                 "(.jpg/.png/...): fill it with background photos, fix "
                                 "synthesis.cut_paste.backgrounds, or use backgrounds=generated")
            self._files = files
        return self._files

    def _photo(self, rel: str) -> Image.Image:
        if rel in self._cache:
            self._cache.move_to_end(rel)
            return self._cache[rel]
        from persrep.data.layout import decode_image

        storage = self._storage()
        photo = decode_image(storage.read_bytes(rel), storage.uri(rel))
        self._cache[rel] = photo
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return photo

    def __call__(self, seed: int, size: int) -> Image.Image:
        rng = np.random.default_rng(seed)
        photo = self._photo(self.files[int(rng.integers(len(self.files)))])
        w, h = photo.size
        side = rng.uniform(*CROP_FRACTION) * min(w, h)
        x0, y0 = rng.uniform(0, w - side), rng.uniform(0, h - side)
        return photo.resize((size, size), Image.Resampling.BILINEAR, box=(x0, y0, x0 + side, y0 + side))


class BaseModelBackgrounds:
    """A ``generated`` background source: the base diffusion model prompted with a scene.

    ``sampler`` is anything with ``sample(rows) -> list[SampledImage]`` that draws the
    un-personalised base model (e.g. :class:`persrep.generation.dreambooth.BaseModelSampler`).
    The prompt comes from :data:`BACKGROUND_PROMPTS` by seed; the row's seed is the background seed.
    """

    def __init__(self, sampler: Any, cfg: float):
        self.sampler = sampler
        self.cfg = cfg

    def _row(self, seed: int, index: int) -> SampleRow:
        return SampleRow(instance="backgrounds", role="negative", generator="base",
                         prompt=background_prompt(seed), cfg=self.cfg, seed=seed,
                         caption_source="background", index=index)

    def many(self, seeds: list[int], size: int) -> list[Image.Image]:
        drawn = self.sampler.sample([self._row(s, i) for i, s in enumerate(seeds)])
        return [fit_canvas(d.image, size) for d in drawn]

    def __call__(self, seed: int, size: int) -> Image.Image:
        return self.many([seed], size)[0]


def fit_canvas(image: Image.Image, size: int) -> Image.Image:
    """RGB, ``size`` x ``size`` (a source that returns another size is resized, not refused)."""
    image = image.convert("RGB")
    return image if image.size == (size, size) else image.resize((size, size), Image.Resampling.BILINEAR)


# ---------------------------------------------------------------------------------------------
# geometry and compositing
@dataclass(frozen=True)
class Placement:
    """Where and how one foreground is pasted; a pure function of the row's seed."""

    background_seed: int
    scale: float
    angle: float  # degrees, counter-clockwise
    flip: bool
    x_fraction: float  # position within the allowed offset range, 0..1
    y_fraction: float


def draw_placement(seed: int, cut_paste: Any) -> Placement:
    """Draw a placement from ``default_rng(seed)``. Every value is always drawn, in a fixed order,
    so changing one setting (e.g. the scale range) leaves the other draws of a seed unchanged."""
    rng = np.random.default_rng(seed)
    background_seed = int(rng.integers(0, 2**31 - 1))
    lo, hi = cut_paste.scale_range
    scale = float(rng.uniform(lo, hi))
    angle = float(rng.uniform(-cut_paste.rotation_degrees, cut_paste.rotation_degrees))
    flip = bool(rng.random() < 0.5) and bool(cut_paste.flip)
    x_fraction, y_fraction = (float(v) for v in rng.random(2))
    return Placement(background_seed, scale, angle, flip, x_fraction, y_fraction)


def cut_out(image: Image.Image, mask: Image.Image, where: str) -> Image.Image:
    """The masked object, cropped to its mask box, as premultiplied RGBa (mask = alpha)."""
    solid = mask.convert("L").point(lambda v: 255 if v > 0 else 0)
    box = solid.getbbox()
    if box is None:
        raise ValueError(f"{where}: the mask is empty (no foreground pixel): fix the train_masks/ file")
    rgba = image.convert("RGB")
    rgba.putalpha(solid)
    return rgba.crop(box).convert("RGBa")


def transform_foreground(cutout: Image.Image, placement: Placement, canvas: int) -> tuple[np.ndarray, np.ndarray]:
    """Flip, scale, rotate a cut-out; returns (colour HxWx3 uint8, solid HxW bool) cropped to the object."""
    fg = cutout.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if placement.flip else cutout
    factor = max(MIN_OBJECT_PX, placement.scale * canvas) / max(fg.size)
    size = (max(1, round(fg.width * factor)), max(1, round(fg.height * factor)))
    fg = fg.resize(size, Image.Resampling.BILINEAR)
    if placement.angle:
        fg = fg.rotate(placement.angle, resample=Image.Resampling.BILINEAR, expand=True)
    rgba = np.asarray(fg.convert("RGBA"))
    solid = rgba[..., 3] >= ALPHA_THRESHOLD
    if not solid.any():  # a hair-thin object shrunk below half a pixel: keep what is left of it
        solid = rgba[..., 3] > 0
    rows, cols = np.flatnonzero(solid.any(axis=1)), np.flatnonzero(solid.any(axis=0))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    return rgba[top:bottom, left:right, :3], solid[top:bottom, left:right]


def composite(background: Image.Image, colour: np.ndarray, solid: np.ndarray, x_fraction: float,
              y_fraction: float, edge_blur: float) -> tuple[Image.Image, Image.Image]:
    """Paste ``colour`` where ``solid`` onto ``background``; returns (image, mask L 0/255).

    Pixels outside the returned mask are the background's exactly; see the module docstring.
    """
    bg = np.asarray(background.convert("RGB"), dtype=np.float32)
    canvas_h, canvas_w = bg.shape[:2]
    h, w = solid.shape
    # uniform over [0, canvas - size]; negative range when the object is larger than the canvas
    x0, y0 = round(x_fraction * (canvas_w - w)), round(y_fraction * (canvas_h - h))
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x0 + w, canvas_w), min(y0 + h, canvas_h)
    mask = np.zeros((canvas_h, canvas_w), dtype=bool)
    fg = np.zeros_like(bg)
    mask[cy0:cy1, cx0:cx1] = solid[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
    fg[cy0:cy1, cx0:cx1] = colour[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
    mask_image = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
    weight = mask.astype(np.float32)
    if edge_blur > 0:
        soft = np.asarray(mask_image.filter(ImageFilter.GaussianBlur(edge_blur)), dtype=np.float32) / 255
        weight = np.where(mask, np.clip(soft, MIN_INNER_WEIGHT, 1.0), 0.0).astype(np.float32)
    weight = weight[..., None]
    out = np.rint(bg * (1 - weight) + fg * weight).clip(0, 255).astype(np.uint8)
    return Image.fromarray(out, mode="RGB"), mask_image


# ---------------------------------------------------------------------------------------------
# the generator type
@register_generator
class CutPasteGenerator(RealPhotosGenerator):
    """Real masked foregrounds on real or generated backgrounds; emits the exact pasted mask.

    ``data_root`` resolves ``@data/`` background folders; ``background_source`` is required when
    ``synthesis.cut_paste.backgrounds`` is ``generated`` (and refused otherwise, so a run never
    silently ignores one of the two). Both may also be set as attributes after construction.
    """

    type_name = "cut_paste"
    capabilities = Capabilities(needs_masks=True, shared_inputs=frozenset({"backgrounds"}))

    @classmethod
    def from_context(cls, ctx: Any, category: str, stage: str) -> "CutPasteGenerator":
        """``@data/`` folders resolved against the data set; generated backgrounds read from the
        category's shared unit (planned from the settings alone, so the Ray Data synthesis path,
        which rebuilds units from rows, finds it too)."""
        gen = cls(ctx.settings, data_root=ctx.data_path)
        published = ctx.shared_images("backgrounds", category) if stage == "synthesis" else None
        if published is not None:
            gen.background_source = PublishedBackgrounds(published)
        return gen

    @classmethod
    def synthesis_settings(cls, settings: Any) -> dict[str, Any]:
        cut_paste = settings.synthesis.cut_paste.model_dump(mode="json")
        cut_paste.pop("num_backgrounds")  # counted in the backgrounds unit's key, if generated
        return {"cut_paste": cut_paste}

    def __init__(self, settings: Any, device: Any = None, *, data_root: str | None = None,
                 background_source: BackgroundSource | None = None):
        super().__init__(settings, device)
        self.data_root = data_root
        self.background_source = background_source
        self._folder: FolderBackgrounds | None = None
        self._cutouts: list[Image.Image] = []

    def check_instance(self, instance: InstanceData) -> None:
        super().check_instance(instance)
        if instance.train_masks is None:
            raise ValueError(f"cut_paste needs the object's masks, but instance {instance.name!r} has "
                             "no train masks: add train_masks/<instance>/ (one binary mask per photo), "
                             "or use generator type real_only or dreambooth, which need no masks")
        for i, mask in enumerate(instance.train_masks):
            if mask.convert("L").getbbox() is None:
                raise ValueError(f"instance {instance.name!r} train mask {i} is empty (no foreground "
                                 "pixel): cut_paste has nothing to paste; fix the train_masks/ file")

    def load(self, artifact: Any) -> None:
        super().load(artifact)
        inst = self.instance
        self._cutouts = [cut_out(image, mask, f"instance {inst.name!r} train mask {i}")
                         for i, (image, mask) in enumerate(zip(inst.train_images, inst.train_masks))]

    def backgrounds_setting(self) -> str:
        """The background folder this run reads (``@data/`` resolved), or ``generated``."""
        value = self.settings.synthesis.cut_paste.backgrounds
        return value if value == GENERATED else resolve_data_path(value, self.data_root)

    def sampling_settings(self) -> dict[str, Any]:
        """What, beyond the artifact and the rows, determines ``sample``'s pixels (for shard keys).

        For ``generated`` backgrounds the caller adds the base model's identity."""
        syn = self.settings.synthesis
        return {"cut_paste": syn.cut_paste.model_dump(mode="json"), "resolution": syn.resolution,
                "backgrounds": self.backgrounds_setting()}

    def _background_source(self) -> BackgroundSource:
        setting = self.backgrounds_setting()
        if setting == GENERATED:
            if self.background_source is None:
                raise ValueError("synthesis.cut_paste.backgrounds=generated but no background source is "
                                 "set: the synthesis stage sets generator.background_source (e.g. "
                                 "BaseModelBackgrounds over the base model); or set backgrounds to a "
                                 "folder of photos")
            return self.background_source
        if self.background_source is not None:
            raise ValueError(f"synthesis.cut_paste.backgrounds={setting!r} (a folder) but a "
                             "background_source was also given: set backgrounds=generated to use "
                             "the source, or drop the source to use the folder")
        if self._folder is None or self._folder.location != setting:
            self._folder = FolderBackgrounds(setting, self.settings.storage.s3_endpoint)
        return self._folder

    def _backgrounds(self, seeds: list[int], size: int) -> list[Image.Image]:
        source = self._background_source()
        many: Callable[[list[int], int], list[Image.Image]] | None = getattr(source, "many", None)
        drawn = many(seeds, size) if many is not None else [source(s, size) for s in seeds]
        if len(drawn) != len(seeds):
            raise ValueError(f"background source returned {len(drawn)} images for {len(seeds)} seeds")
        return [fit_canvas(image, size) for image in drawn]

    def sample(self, rows: list[SampleRow]) -> list[SampledImage]:
        self.loaded_instance(rows)
        syn = self.settings.synthesis
        size, cut_paste = syn.resolution, syn.cut_paste
        placements = [draw_placement(row.seed, cut_paste) for row in rows]
        backgrounds = self._backgrounds([p.background_seed for p in placements], size)
        out = []
        for row, placement, background in zip(rows, placements, backgrounds):
            cutout = self._cutouts[row.index % len(self._cutouts)]
            colour, solid = transform_foreground(cutout, placement, size)
            image, mask = composite(background, colour, solid, placement.x_fraction,
                                    placement.y_fraction, cut_paste.edge_blur)
            out.append(SampledImage(image, mask, row))
        return out


class PublishedBackgrounds:
    """A background source over published images (a ``backgrounds`` unit): seed -> one of them."""

    def __init__(self, images: list[Image.Image]):
        self.images = images

    def __call__(self, seed: int, size: int) -> Image.Image:
        return fit_canvas(self.images[seed % len(self.images)], size)
