"""The one interface every personalised generator implements, and the registry that finds them.

A *generator type* (``real_only``, ``cut_paste``, ``dreambooth``, ``masked_dreambooth``, ...) turns
an instance's few real photos into synthetic training images. The pipeline drives every type the
same way::

    generator = get_generator("dreambooth", settings)        # settings: persrep.config.Settings
    key = generator.artifact_key(instance)                   # skip the unit if already published
    artifact = generator.prepare(instance, out_dir)          # train if the type needs it
    # ... publish artifact.files under <root>/generators/<artifact.key>/, later, maybe elsewhere:
    generator.load(artifact)
    images = generator.sample(rows)                          # one SampledImage per SampleRow

Contract (stable: other types are written against it):

- ``prepare`` is deterministic for fixed settings and inputs; it may use ``out_dir`` as scratch
  space and a cache (it is never published). Types with ``needs_training = False`` return an
  artifact whose ``files`` may be empty; ``load`` still receives it.
- ``artifact.files`` are the bytes to publish (e.g. ``*.safetensors``); ``artifact.settings`` is
  JSON-able and records what produced them; ``artifact.key`` equals ``artifact_key(instance)``.
- ``sample(rows)`` returns images in the order of ``rows``. A row carries its own ``seed``, so any
  image can be regenerated alone, whatever batch it was first drawn in. ``mask`` is the
  foreground mask when the type knows it (cut-and-paste), else ``None``.
- A type reads only the settings sections it needs from the full :class:`~persrep.config.Settings`.

Adding a fifth type: subclass :class:`PersonalizedGenerator`, set ``type_name`` and
``needs_training``, decorate the class with :func:`register_generator`, and import its module in
:data:`_BUILTIN_MODULES` (or anywhere before :func:`get_generator` is called).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from PIL import Image

from persrep.config import content_key
from persrep.hashing import image_fingerprint, stable_seed  # noqa: F401 (re-exported)

Role = Literal["positive", "negative"]
IDENTIFIER = "<new1>"  # the reference's rare-token identifier: plain text, not a new token

# modules that define the built-in types, imported on first lookup (keeps `import base` light
# and lets a type's module fail to import without breaking the others)
_BUILTIN_MODULES = {
    "real_only": "persrep.generation.real_only",
    "cut_paste": "persrep.generation.cut_paste",
    "dreambooth": "persrep.generation.dreambooth",
    "masked_dreambooth": "persrep.generation.dreambooth",
}
_REGISTRY: dict[str, type["PersonalizedGenerator"]] = {}


@dataclass
class InstanceData:
    """One instance's real training data (typically exactly 3 photos), masks optional."""

    name: str
    category: str
    train_images: list[Image.Image]
    train_masks: list[Image.Image] | None = None

    def __post_init__(self) -> None:
        if self.train_masks is not None and len(self.train_masks) != len(self.train_images):
            raise ValueError(f"instance {self.name!r}: {len(self.train_images)} train images but "
                             f"{len(self.train_masks)} masks; need one mask per image (or none)")


@dataclass
class SampleRow:
    """One image to synthesise. ``seed`` alone determines its noise; ``index`` numbers it in its set."""

    instance: str
    role: Role
    generator: str
    prompt: str
    cfg: float
    seed: int
    caption_source: str = "template"
    index: int = 0


@dataclass
class SampledImage:
    image: Image.Image
    mask: Image.Image | None
    row: SampleRow


@dataclass
class GeneratorArtifact:
    """What ``prepare`` produced for one instance: files to publish plus how they were made."""

    generator_type: str
    instance: str
    files: dict[str, bytes] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    key: str = ""


class PersonalizedGenerator(ABC):
    """Base class of every generator type; see the module docstring for the contract."""

    type_name: ClassVar[str]
    needs_training: ClassVar[bool]

    def __init__(self, settings: Any, device: Any = None):
        """``settings``: a :class:`persrep.config.Settings`; ``device``: None = GPU if present."""
        self.settings = settings
        self.device = device

    def settings_for_key(self) -> dict[str, Any]:
        """The settings that determine this type's artifact (override to narrow or widen)."""
        return {"base_model": self.settings.generator.base_model}

    def artifact_key(self, instance: InstanceData) -> str:
        """Identity of ``prepare(instance)``'s output: type, its settings and the instance's data."""
        return content_key(self.type_name, self.settings_for_key(), instance_data_key(instance))

    @abstractmethod
    def prepare(self, instance: InstanceData, out_dir: str | Path) -> GeneratorArtifact:
        """Train (if needed) for ``instance``; ``out_dir`` is local scratch/cache space."""

    @abstractmethod
    def load(self, artifact: GeneratorArtifact) -> None:
        """Make ``sample`` use ``artifact`` (e.g. read published weights)."""

    @abstractmethod
    def sample(self, rows: list[SampleRow]) -> list[SampledImage]:
        """One image per row, in order."""


def register_generator(cls: type[PersonalizedGenerator]) -> type[PersonalizedGenerator]:
    """Class decorator: make ``cls`` available to :func:`get_generator` under ``cls.type_name``."""
    name = getattr(cls, "type_name", None)
    if not name or not isinstance(name, str):
        raise TypeError(f"{cls.__name__} needs a class attribute type_name (a non-empty string)")
    if not isinstance(getattr(cls, "needs_training", None), bool):
        raise TypeError(f"{cls.__name__} needs a class attribute needs_training (True or False)")
    existing = _REGISTRY.get(name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"generator type {name!r} is already registered by {existing.__module__}."
                         f"{existing.__qualname__}; pick another type_name")
    _REGISTRY[name] = cls
    return cls


def registered_types() -> list[str]:
    return sorted(set(_REGISTRY) | set(_BUILTIN_MODULES))


def generator_class(type_name: str) -> type[PersonalizedGenerator]:
    if type_name not in _REGISTRY and type_name in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[type_name])
    if type_name not in _REGISTRY:
        raise ValueError(f"unknown generator type {type_name!r}: choose one of {registered_types()}")
    return _REGISTRY[type_name]


def get_generator(type_name: str, settings: Any, device: Any = None) -> PersonalizedGenerator:
    """Build the generator registered as ``type_name`` from the full settings."""
    return generator_class(type_name)(settings, device=device)


def instance_data_key(instance: InstanceData) -> str:
    """Identity of an instance's inputs: name, category, and its images' and masks' pixels."""
    masks = [image_fingerprint(m) for m in instance.train_masks] if instance.train_masks else None
    return content_key({"name": instance.name, "category": instance.category,
                        "images": [image_fingerprint(i) for i in instance.train_images], "masks": masks})

