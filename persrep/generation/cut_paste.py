"""The ``cut_paste`` generator: the instance's masked photos pasted onto backgrounds.

Each positive is one real foreground (train image x train mask, cropped to the mask's box)
flipped, scaled, rotated and pasted at a random position onto a background, with the exact
pasted mask emitted beside it. No training; cheap enough for CPU machines.

Geometry and blending: :mod:`persrep.compositing` (also used by ``persrep data composite``); the
foreground is photo ``row.index mod n`` (every photo used equally often).

Settings: its own section, ``generator.cut_paste`` (:mod:`persrep.generation.cut_paste_settings`).

Backgrounds (``generator.cut_paste.backgrounds``): a folder of real photos (local or ``s3://``;
``@data/...`` is relative to the data set root, see :func:`resolve_data_path`), cropped at random
and resized to ``synthesis.resolution``; or ``generated``: the synthesis stage injects a
``background_source(seed, size) -> PIL.Image`` that draws from the base diffusion model
(:class:`BaseModelBackgrounds` adapts a base-model sampler, with :data:`BACKGROUND_PROMPTS`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from persrep.compositing import (ALPHA_THRESHOLD, MIN_INNER_WEIGHT, MIN_OBJECT_PX,  # noqa: F401 (re-exported)
                                 Placement, composite, cut_out, draw_placement, transform_foreground)
from persrep.data.layout import DATA_PREFIX, resolve_data_path  # noqa: F401 (re-exported)
from persrep.generation.base import (Capabilities, InstanceData, Sampler, SampledImage, SampleRow,
                                     Services, SharedInput, register_generator, stable_seed)
from persrep.generation.cut_paste_settings import CutPasteSettings
from persrep.generation.real_only import RealPhotosGenerator

GENERATED = "generated"
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
                                 "generator.cut_paste.backgrounds, or use backgrounds=generated")
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
# the generator type
@register_generator
class CutPasteGenerator(RealPhotosGenerator):
    """Real masked foregrounds on real or generated backgrounds; emits the exact pasted mask.

    ``services.data_root`` resolves ``@data/`` background folders; ``background_source`` is
    required when ``generator.cut_paste.backgrounds`` is ``generated`` (and refused otherwise, so a
    run never silently ignores one of the two). It may also be set as an attribute after construction.
    """

    type_name = "cut_paste"
    capabilities = Capabilities(needs_masks=True, shared_inputs=frozenset({"backgrounds"}))
    settings_class = CutPasteSettings

    @classmethod
    def create(cls, section: CutPasteSettings, sampler: Sampler, services: Services, category: str,
               stage: str) -> "CutPasteGenerator":
        """``@data/`` folders resolved against the data set; generated backgrounds read from the
        category's shared unit (planned from the settings alone, so the Ray Data synthesis path,
        which rebuilds units from rows, finds it too)."""
        gen = cls(section, sampler, services)
        published = services.shared_images("backgrounds", category) if stage == "synthesis" else None
        if published is not None:
            gen.background_source = PublishedBackgrounds(published)
        return gen

    @classmethod
    def synthesis_settings(cls, section: CutPasteSettings) -> dict[str, Any]:
        cut_paste = section.model_dump(mode="json")
        cut_paste.pop("num_backgrounds")  # counted in the backgrounds unit's key, if generated
        return {"cut_paste": cut_paste}

    @classmethod
    def shared_input(cls, kind: str, section: CutPasteSettings, sampler: Sampler,
                     category: str) -> SharedInput | None:
        """``backgrounds``: the category's generated backgrounds (none for a folder of photos)."""
        if kind != "backgrounds" or section.backgrounds != GENERATED:
            return None
        return SharedInput(list(BACKGROUND_PROMPTS), section.num_backgrounds, sampler.seed,
                           {"steps": sampler.inference_steps, "scheduler": sampler.scheduler,
                            "cfg": float(sampler.cfg[0]), "resolution": sampler.resolution})

    @classmethod
    def draw_shared(cls, kind: str, spec: SharedInput, category: str, section: CutPasteSettings,
                    sampler: Sampler) -> list[Image.Image]:
        from persrep.generation.dreambooth import BaseModelSampler

        source = BaseModelBackgrounds(BaseModelSampler(sampler), spec.sampler["cfg"])
        seeds = [stable_seed("background", category, spec.seed, i) for i in range(spec.count)]
        images: list[Image.Image] = []
        for start in range(0, len(seeds), sampler.batch_size):
            images += source.many(seeds[start:start + sampler.batch_size], spec.sampler["resolution"])
        return images

    @classmethod
    def uses_base_model(cls, section: CutPasteSettings) -> bool:
        return section.backgrounds == GENERATED  # generated backgrounds come from the base model

    @classmethod
    def check_inputs(cls, section: CutPasteSettings, resolve: Callable[[str], str], s3_endpoint: str | None) -> None:
        """A backgrounds folder (not ``generated``) exists, is a folder and holds images."""
        where = section.backgrounds
        if where == GENERATED:
            return
        from persrep.data.layout import is_image_name
        from persrep.errors import ConfigError
        from persrep.storage import Storage, StorageError

        fix = "give a folder of background photos (e.g. @data/backgrounds), or use backgrounds=generated"
        try:
            location = resolve(where)
            if "://" not in location:
                p = Path(location)
                if not p.exists():
                    raise ConfigError(f"generator.cut_paste.backgrounds={where}: {location} not found: {fix}")
                if not p.is_dir():
                    raise ConfigError(f"generator.cut_paste.backgrounds={where}: {location} is a file, "
                                      f"not a folder: {fix}")
            files = Storage(location, s3_endpoint).list_files()
        except (StorageError, ValueError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"generator.cut_paste.backgrounds={where}: {str(exc)[:240]} ({fix})") from None
        if not any(is_image_name(f.rsplit("/", 1)[-1]) for f, _ in files):
            raise ConfigError(f"generator.cut_paste.backgrounds={where}: no images in {location}: {fix}")

    def __init__(self, section: CutPasteSettings, sampler: Sampler, services: Services | None = None,
                 device: Any = None, *, background_source: BackgroundSource | None = None):
        super().__init__(section, sampler, services, device)
        self.data_root = self.services.data_root
        self.background_source = background_source
        self._folder: FolderBackgrounds | None = None
        self._cutouts: list[Image.Image] = []

    def check_instance(self, instance: InstanceData) -> None:
        super().check_instance(instance)
        if instance.train_masks is None:
            raise ValueError(f"cut_paste needs the object's masks, but instance {instance.name!r} has "
                             "no train masks: add train_masks/<instance>/ (one binary mask per photo), "
                             "or use generator type real_only or dreambooth, which need no masks")
        if not pasteable(instance.train_masks):
            raise ValueError(f"instance {instance.name!r}: every train mask is empty (no foreground "
                             "pixel): cut_paste has nothing to paste; fix the train_masks/ files, or "
                             "delete them and set generator.auto_masks=true")

    def load(self, artifact: Any) -> None:
        super().load(artifact)
        inst = self.instance
        # a photo whose mask is empty is left out; the others serve (check_instance: one at least)
        self._cutouts = [cut_out(inst.train_images[i], inst.train_masks[i], f"instance {inst.name!r} train mask {i}")
                         for i in pasteable(inst.train_masks)]

    def backgrounds_setting(self) -> str:
        """The background folder this run reads (``@data/`` resolved), or ``generated``."""
        value = self.section.backgrounds
        return value if value == GENERATED else resolve_data_path(value, self.data_root)

    def sampling_settings(self) -> dict[str, Any]:
        """What, beyond the artifact and the rows, determines ``sample``'s pixels (for shard keys).

        For ``generated`` backgrounds the caller adds the base model's identity."""
        return {"cut_paste": self.section.model_dump(mode="json"), "resolution": self.sampler.resolution,
                "backgrounds": self.backgrounds_setting()}

    def _background_source(self) -> BackgroundSource:
        setting = self.backgrounds_setting()
        if setting == GENERATED:
            if self.background_source is None:
                raise ValueError("generator.cut_paste.backgrounds=generated but no background source is "
                                 "set: the synthesis stage sets generator.background_source (e.g. "
                                 "BaseModelBackgrounds over the base model); or set backgrounds to a "
                                 "folder of photos")
            return self.background_source
        if self.background_source is not None:
            raise ValueError(f"generator.cut_paste.backgrounds={setting!r} (a folder) but a "
                             "background_source was also given: set backgrounds=generated to use "
                             "the source, or drop the source to use the folder")
        if self._folder is None or self._folder.location != setting:
            self._folder = FolderBackgrounds(setting, self.services.s3_endpoint)
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
        size, cut_paste = self.sampler.resolution, self.section
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


def pasteable(masks: list[Image.Image]) -> list[int]:
    """Indices of the masks with at least one foreground pixel."""
    return [i for i, m in enumerate(masks) if m.convert("L").getbbox() is not None]


class PublishedBackgrounds:
    """A background source over published images (a ``backgrounds`` unit): seed -> one of them."""

    def __init__(self, images: list[Image.Image]):
        self.images = images

    def __call__(self, seed: int, size: int) -> Image.Image:
        return fit_canvas(self.images[seed % len(self.images)], size)
