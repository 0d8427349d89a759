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

Adding a fifth type: one module with a subclass of :class:`PersonalizedGenerator` that sets
``type_name``, ``needs_training`` and its :class:`Capabilities` (what it uses and needs, as data),
decorated with :func:`register_generator`. The planner, pre-flight, memory plan and runner ask the
class (:func:`generator_caps`), never its name; ``from_context`` builds it from the run context
(override it when the type reads shared inputs). A built-in type is also named, by module, in
:data:`persrep.registry.GENERATORS` so it is imported on first use; any other is registered when
its module is imported (``tests/test_registry_extension.py`` does exactly that).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

from PIL import Image

from persrep.config import content_key
from persrep.hashing import image_fingerprint, stable_seed  # noqa: F401 (re-exported)
from persrep.registry import GENERATORS

Role = Literal["positive", "negative"]
IDENTIFIER = "<new1>"  # the reference's rare-token identifier: plain text, not a new token

# the built-in types are named, by module, in persrep.registry.GENERATORS (imported on first
# lookup: keeps `import base` light and lets one type's module fail without breaking the others)


@dataclass(frozen=True)
class Capabilities:
    """What a generator type uses and needs, as data: every stage asks this, never the type's name.

    ``trains_per_instance`` mirrors the class's ``needs_training`` (set by :func:`register_generator`).
    """

    trains_per_instance: bool = False  # one generator-prep unit per instance (DreamBooth)
    positives_are_real: bool = False  # its positives are the real photos: no synthesis unit (real-only)
    uses_guidance: bool = False  # one data configuration per synthesis.cfg value
    uses_captions: bool = False  # one data configuration per caption source (prompts matter)
    needs_masks: bool = False  # the instance's train masks (given or predicted) must exist
    needs_base_model: bool = False  # the diffusion base model must be available (pre-flight)
    # shared per-category base-model images it reads (persrep/pipeline/shared_images.py):
    # "class_images" (at generator prep), "backgrounds" (at synthesis, when generated)
    shared_inputs: frozenset[str] = frozenset()


class GeneratorContext(Protocol):
    """What :meth:`PersonalizedGenerator.from_context` may read: the run's settings, the data set's
    root (``@data/`` paths) and the published per-category shared images (None when the run has
    no such unit). :class:`persrep.pipeline.context.RunContext` is one."""

    settings: Any
    data_path: str

    def shared_images(self, kind: str, category: str) -> list[Image.Image] | None: ...


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
    capabilities: ClassVar[Capabilities] = Capabilities()

    def __init__(self, settings: Any, device: Any = None):
        """``settings``: a :class:`persrep.config.Settings`; ``device``: None = GPU if present."""
        self.settings = settings
        self.device = device

    @classmethod
    def from_context(cls, ctx: GeneratorContext, category: str, stage: str) -> "PersonalizedGenerator":
        """The factory the pipeline uses: a generator built from the run context for one
        instance of ``category``, at ``stage`` (``generator_prep`` or ``synthesis``). Override to
        read shared inputs (DreamBooth's class images, cut-and-paste's backgrounds)."""
        return cls(ctx.settings)

    @classmethod
    def synthesis_settings(cls, settings: Any) -> dict[str, Any]:
        """The settings, beyond the rows and the sampler, that change what a synthesis unit draws
        (they enter its key). Default: none."""
        return {}

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
    if not isinstance(getattr(cls, "capabilities", None), Capabilities):
        raise TypeError(f"{cls.__name__}.capabilities must be a Capabilities")
    if name in GENERATORS.builtin and cls.__module__ != GENERATORS.builtin[name]:
        GENERATORS.get(name)  # the built-in first: the clash below names it
    GENERATORS.add(name, cls)
    if cls.capabilities.trains_per_instance != cls.needs_training:  # one truth: needs_training
        cls.capabilities = replace(cls.capabilities, trains_per_instance=cls.needs_training)
    return cls


def registered_types() -> list[str]:
    return GENERATORS.names()


def generator_class(type_name: str) -> type[PersonalizedGenerator]:
    return GENERATORS.get(type_name)


def generator_caps(type_name: str) -> Capabilities:
    """The capabilities of the generator type registered as ``type_name``."""
    return generator_class(type_name).capabilities


def any_generator(types: Any, predicate: Any) -> bool:
    """Whether any of ``types`` (generator type names) has capabilities matching ``predicate``."""
    return any(predicate(generator_caps(t)) for t in types)


def get_generator(type_name: str, settings: Any, device: Any = None) -> PersonalizedGenerator:
    """Build the generator registered as ``type_name`` from the full settings."""
    return generator_class(type_name)(settings, device=device)


def instance_data_key(instance: InstanceData) -> str:
    """Identity of an instance's inputs: name, category, and its images' and masks' pixels."""
    masks = [image_fingerprint(m) for m in instance.train_masks] if instance.train_masks else None
    return content_key({"name": instance.name, "category": instance.category,
                        "images": [image_fingerprint(i) for i in instance.train_images], "masks": masks})

