"""The ``real_only`` generator: an instance's positives are its own real photos.

Nothing is trained and nothing is synthesised: row ``i`` gets real image ``i mod n`` unchanged
(the augmentation that makes 450 "positives" out of 3 photos happens later, in training), with
its mask when the instance has masks. Negatives are not this type's job (they come from the base
diffusion model or an external pool), so a negative row is an error.

The artifact of a real-photo type is the instance's photos themselves (lossless PNG plus a small
JSON record): ``load`` in another process, or on another machine, then needs nothing but the
published artifact. :class:`RealPhotosGenerator` holds that shared part; ``cut_paste`` builds on it.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from PIL import Image

from persrep.generation.base import (GeneratorArtifact, InstanceData, PersonalizedGenerator,
                                     SampledImage, SampleRow, instance_data_key, register_generator)
from persrep.generation.base import Capabilities

RECORD_FILE = "instance.json"
ARTIFACT_FORMAT = "real-photos-v1"
# a mask whose aspect ratio differs more than this from its image's belongs to another photo
_MASK_ASPECT_TOLERANCE = 0.02


def image_file(i: int) -> str:
    return f"image_{i:03d}.png"


def mask_file(i: int) -> str:
    return f"mask_{i:03d}.png"


def binary_mask(mask: Image.Image, size: tuple[int, int], where: str) -> Image.Image:
    """``mask`` as mode ``L`` with 0 / 255 (foreground = any value > 0) at the image's ``size``.

    A mask stored at another resolution of the same photo is resized (nearest neighbour); one of
    another shape is refused, because pairing it with the image would misplace the object.
    """
    if mask.size != size:
        (mw, mh), (w, h) = mask.size, size
        if abs(mw / mh - w / h) > _MASK_ASPECT_TOLERANCE * (w / h):
            raise ValueError(f"{where}: mask is {mw}x{mh} but its image is {w}x{h} (different "
                             "shape): the mask belongs to another photo; fix the train_masks/ file")
        mask = mask.resize(size, Image.Resampling.NEAREST)
    return mask.convert("L").point(lambda v: 255 if v > 0 else 0)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def reject_negative_rows(rows: list[SampleRow], type_name: str) -> None:
    negatives = [r for r in rows if r.role != "positive"]
    if negatives:
        raise ValueError(f"{type_name} makes positives only, got a row with role {negatives[0].role!r} "
                         f"(instance {negatives[0].instance!r}, index {negatives[0].index}): "
                         "negatives come from the base diffusion model (BaseModelSampler) or an "
                         "external pool (personalization.negatives=external)")


class RealPhotosGenerator(PersonalizedGenerator):
    """Shared base of the types whose only input is the instance's photos (no training).

    ``prepare`` packs the photos (and binarised masks) into the artifact; ``load`` unpacks them.
    Subclasses implement ``sample`` and may tighten :meth:`check_instance`.
    """

    needs_training = False

    def __init__(self, section: Any, sampler: Any, services: Any = None, device: Any = None):
        super().__init__(section, sampler, services, device)
        self.instance: InstanceData | None = None

    def settings_for_key(self) -> dict[str, Any]:
        # the artifact is the photos themselves: no setting (not even the base model) changes it
        return {"format": ARTIFACT_FORMAT}

    def check_instance(self, instance: InstanceData) -> None:
        """Raise if this type cannot use ``instance`` (override to require masks, ...)."""
        if not instance.train_images:
            raise ValueError(f"{self.type_name}: instance {instance.name!r} has no train images: "
                             "add its photos under train/<instance>/")

    def prepare(self, instance: InstanceData, out_dir: str | Path) -> GeneratorArtifact:
        self.check_instance(instance)
        files: dict[str, bytes] = {}
        for i, image in enumerate(instance.train_images):
            files[image_file(i)] = _png(image)
        if instance.train_masks is not None:
            for i, (image, mask) in enumerate(zip(instance.train_images, instance.train_masks)):
                where = f"instance {instance.name!r} train mask {i}"
                files[mask_file(i)] = _png(binary_mask(mask, image.size, where))
        record = {"format": ARTIFACT_FORMAT, "instance": instance.name, "category": instance.category,
                  "images": len(instance.train_images), "masks": instance.train_masks is not None,
                  "inputs": {"instance": instance_data_key(instance)}}
        files[RECORD_FILE] = json.dumps(record, indent=1, sort_keys=True).encode()
        return GeneratorArtifact(self.type_name, instance.name, files, record, self.artifact_key(instance))

    def load(self, artifact: GeneratorArtifact) -> None:
        if artifact.generator_type != self.type_name:
            raise ValueError(f"artifact of type {artifact.generator_type!r} given to {self.type_name!r}: "
                             f"load it with get_generator({artifact.generator_type!r}, settings)")
        if RECORD_FILE not in artifact.files:
            raise ValueError(f"{self.type_name} artifact for {artifact.instance!r} lacks {RECORD_FILE}: "
                             "it was not made by prepare(); re-run the generator stage for this instance")
        record = json.loads(artifact.files[RECORD_FILE])
        count = int(record["images"])
        images = [_decode(artifact.files[image_file(i)]) for i in range(count)]
        masks = [_decode(artifact.files[mask_file(i)]) for i in range(count)] if record["masks"] else None
        instance = InstanceData(record["instance"], record["category"], images, masks)
        self.check_instance(instance)
        self.instance = instance

    def loaded_instance(self, rows: list[SampleRow]) -> InstanceData:
        """The loaded instance, after checking that ``rows`` are positives of that instance."""
        if self.instance is None:
            raise RuntimeError(f"{self.type_name}: call load(artifact) before sample()")
        reject_negative_rows(rows, self.type_name)
        foreign = [r for r in rows if r.instance != self.instance.name]
        if foreign:
            raise ValueError(f"{self.type_name}: row for instance {foreign[0].instance!r} sent to the "
                             f"generator loaded for {self.instance.name!r}: load that instance's artifact")
        return self.instance


@register_generator
class RealOnlyGenerator(RealPhotosGenerator):
    """Positives = the instance's real photos; row ``i`` gets photo ``i mod n`` as it is."""

    type_name = "real_only"
    capabilities = Capabilities(positives_are_real=True)

    def sample(self, rows: list[SampleRow]) -> list[SampledImage]:
        instance = self.loaded_instance(rows)
        n = len(instance.train_images)
        out = []
        for row in rows:
            i = row.index % n
            mask = instance.train_masks[i].copy() if instance.train_masks is not None else None
            out.append(SampledImage(instance.train_images[i].copy(), mask, row))
        return out
