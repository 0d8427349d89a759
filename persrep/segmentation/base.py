"""The segmenter slot: one interface, a registry, and what each implementation needs.

A *segmenter* turns images into binary object masks, each with a confidence in [0, 1]::

    seg = make_segmenter(settings.segmentation)                  # or get_segmenter("grabcut", ...)
    out = seg.segment(images, reference=Reference(train_images, train_masks))   # reference optional
    out[0].mask      # bool [H, W], the image's size
    out[0].confidence

``reference`` is the instance's train photos and their masks: PerSAM needs it (its location
prior), GrabCut uses it when given (feature prior from the object's own pixels), SAM ignores it.
Every class declares its :class:`Needs` (weights, GPU preferred) so pre-flight can refuse a
missing model before compute (:func:`require_available`).

Adding one: one module with a subclass of :class:`Segmenter` that sets ``name`` and ``needs``
(and overrides ``preflight`` when it needs a package), decorated with
:func:`register_segmenter`; a built-in one is also named, by module, in
:data:`persrep.registry.SEGMENTERS` (imported on first use).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from persrep.errors import SegmenterUnavailableError  # noqa: F401 (re-exported)
from persrep.registry import SEGMENTERS

# the built-in segmenters are named, by module, in persrep.registry.SEGMENTERS


@dataclass(frozen=True)
class Needs:
    weights: bool  # needs a model (segmentation.model) that must exist before compute
    gpu_preferred: bool  # runs on CPU, but slowly at real size
    reference: bool  # needs the instance's train images + masks (PerSAM)


@dataclass
class Segmentation:
    mask: np.ndarray  # bool [H, W]
    confidence: float  # [0, 1]

    def image(self) -> Image.Image:
        """The mask as an L image (0 / 255), as written to ``*_masks/``."""
        return Image.fromarray(self.mask.astype(np.uint8) * 255, mode="L")


@dataclass
class Reference:
    """An instance's train photos and their (given or predicted) masks."""

    images: list[Image.Image]
    masks: list[np.ndarray | Image.Image]

    def __post_init__(self) -> None:
        if not self.images or len(self.images) != len(self.masks):
            raise ValueError(f"segmenter reference: {len(self.images)} images and {len(self.masks)} "
                             "masks; give one mask per train image")
        self.masks = [as_bool_mask(m, im.size) for m, im in zip(self.masks, self.images)]


def as_bool_mask(mask: np.ndarray | Image.Image, size: tuple[int, int] | None = None) -> np.ndarray:
    """A bool [H, W] array (foreground > 0), resized (nearest) to ``size`` = (W, H) if given."""
    img = mask if isinstance(mask, Image.Image) else Image.fromarray(np.asarray(mask).astype(np.uint8) * 255)
    img = img.convert("L")
    if size is not None and img.size != tuple(size):
        img = img.resize(tuple(size), Image.Resampling.NEAREST)
    return np.asarray(img) > 0


class Segmenter(ABC):
    name: ClassVar[str]
    needs: ClassVar[Needs]

    def __init__(self, settings: Any, device: Any = None):
        """``settings``: :class:`persrep.config.SegmentationSettings`; ``device``: None = GPU if any."""
        self.settings = settings
        self.device = device

    def identity(self) -> dict[str, Any]:
        """The settings that determine this segmenter's masks (unit keys hash it)."""
        s = self.settings
        return {"segmenter": self.name, "model": s.model if self.needs.weights else None}

    @classmethod
    def preflight(cls, settings: Any) -> str:
        """Raise :class:`SegmenterUnavailableError` (one line, the fix) when this segmenter cannot
        run here; return a note saying what it will use. Implementations with weights override it."""
        return f"segmenter {cls.name}: no weights needed"

    @abstractmethod
    def segment(self, images: list[Image.Image], reference: Reference | None = None) -> list[Segmentation]:
        """One :class:`Segmentation` per image, at the image's size, in order."""

    def refine(self, images: list[Image.Image], reference: Reference) -> list[Segmentation]:
        """Segment ``images`` again, started from ``reference`` (the same object's confident masks
        in its other photos): what :mod:`persrep.segmentation.instance_masks` asks for a photo whose
        first mask failed. Default: :meth:`segment` with the reference."""
        return self.segment(images, reference)


def register_segmenter(cls: type[Segmenter]) -> type[Segmenter]:
    if not isinstance(getattr(cls, "name", None), str) or not isinstance(getattr(cls, "needs", None), Needs):
        raise TypeError(f"{cls.__name__} needs class attributes name (str) and needs (Needs)")
    SEGMENTERS.add(cls.name, cls)
    return cls


def segmenter_names() -> list[str]:
    return SEGMENTERS.names()


def segmenter_class(name: str) -> type[Segmenter]:
    return SEGMENTERS.get(name)


def get_segmenter(name: str, settings: Any, device: Any = None) -> Segmenter:
    """The segmenter ``name`` with ``settings`` (a SegmentationSettings; its ``segmenter`` is ignored)."""
    return segmenter_class(name)(settings, device=device)


def make_segmenter(settings: Any, device: Any = None) -> Segmenter:
    """The segmenter named by ``settings.segmenter``."""
    return get_segmenter(settings.segmenter, settings, device)


def require_available(name: str, settings: Any) -> str:
    """Pre-flight: raise :class:`SegmenterUnavailableError` (one line, the fix) when the segmenter
    ``name`` cannot run here; return a note saying what it will use."""
    return segmenter_class(name).preflight(settings)


# -- post-processing shared by the implementations -------------------------------------------
def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 8-connected foreground component."""
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


def fill_holes(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_fill_holes(mask)


def clean_mask(mask: np.ndarray) -> np.ndarray:
    """Largest component, holes filled: one solid object."""
    return fill_holes(largest_component(mask)) if mask.any() else mask.astype(bool)


def border_fraction(mask: np.ndarray) -> float:
    """Fraction of the image's border pixels that are foreground (an object cut by the frame, or
    a mask that leaked into the background)."""
    border = np.concatenate([mask[0], mask[-1], mask[1:-1, 0], mask[1:-1, -1]])
    return float(border.mean()) if border.size else 0.0
