"""The one interface every personalised generator implements, and the registry that finds them.

A *generator type* (``real_only``, ``cut_paste``, ``dreambooth``, ``masked_dreambooth``, ...) turns
an instance's few real photos into synthetic training images. The pipeline drives every type the
same way::

    generator = get_generator("dreambooth", settings)        # its section, the sampler, services
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
- A type receives its own settings section (``generator.<section>``, a pydantic class it declares
  as ``settings_class``; None when it has none), the shared :class:`Sampler` section and a small
  :class:`Services` object (data root, object-store endpoint, the published shared images): never
  the whole ``Settings`` or the run context.

Adding a fifth type: one module with a subclass of :class:`PersonalizedGenerator` that sets
``type_name``, ``needs_training``, its :class:`Capabilities` (what it uses and needs, as data) and,
if it has options, its ``settings_class``, decorated with :func:`register_generator` (which also
adds ``generator.<type>`` to the settings schema). The planner, pre-flight, memory plan, shared
base images and runner ask the class (:func:`generator_caps`, and its class methods
``synthesis_settings``, ``template_prompt``, ``shared_input``/``draw_shared``, ``prep_memory``),
never its name; ``create`` builds it for one instance's category at one stage. A built-in type is
also named, by module, in :data:`persrep.registry.GENERATORS` (its section in
:data:`persrep.registry.GENERATOR_SECTIONS`) so it is imported on first use; any other is
registered when its module is imported (``tests/test_registry_extension.py`` does exactly that).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

from PIL import Image
from pydantic import BaseModel

from persrep.config import add_generator_section, content_key, remove_generator_section
from persrep.hashing import image_fingerprint, stable_seed  # noqa: F401 (re-exported)
from persrep.registry import GENERATOR_SECTIONS, GENERATORS

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
    """What :func:`generator_for` reads to build a generator: the run's settings, the data set's
    root (``@data/`` paths) and the published per-category shared images (None when the run has
    no such unit). :class:`persrep.pipeline.context.RunContext` is one."""

    settings: Any
    data_path: str

    def shared_images(self, kind: str, category: str) -> list[Image.Image] | None: ...


@dataclass(frozen=True)
class Sampler:
    """The shared sampler section every generator draws with: ``synthesis``'s sampler settings and
    the diffusion base model (``generator.base_model``), read once from the settings.

    ``instance_prompt`` / ``class_prompt`` are the run's *template* prompts (caption source
    ``template``; the negatives' class prompt). They are read from ``generator.dreambooth``, where
    settings files have always put them, so every row's prompt, and every unit key, is unchanged."""

    base_model: str = "tiny"
    inference_steps: int = 50
    scheduler: str = "pndm"
    resolution: int = 512
    batch_size: int = 8
    seed: int = 0
    cfg: tuple[float, ...] = (5.0,)
    instance_prompt: str = "a photo of <new1> {category}"
    class_prompt: str = "A photo of {category}"

    @classmethod
    def of(cls, settings: Any) -> "Sampler":
        syn, templates = settings.synthesis, settings.generator.dreambooth
        return cls(settings.generator.base_model, syn.inference_steps, syn.scheduler, syn.resolution,
                   syn.batch_size, syn.seed, tuple(float(c) for c in syn.cfg),
                   templates.instance_prompt, templates.class_prompt)


def _no_shared_images(kind: str, category: str) -> None:
    return None


@dataclass(frozen=True)
class Services:
    """What a generator may use besides its settings: the data set's root (``@data/`` paths), the
    object store's endpoint, and the published per-category shared images (``kind, category ->
    images or None``)."""

    data_root: str | None = None
    s3_endpoint: str | None = None
    shared_images: Callable[[str, str], list[Image.Image] | None] = _no_shared_images


@dataclass(frozen=True)
class SharedInput:
    """One per-category set of base-model images a generator type reads (its unit's identity):
    the prompts drawn in turn, how many, the seed and the sampler settings that shape them."""

    prompts: list[str]
    count: int
    seed: int
    sampler: dict[str, Any]  # steps, scheduler, cfg, resolution


@dataclass(frozen=True)
class MemoryNeed:
    """Host memory (GB by component) one generator-prep unit of a type needs, the GPU-side figure
    (on a GPU) and the settings that size it (named when it fits on no node)."""

    parts: dict[str, float]
    gpu_gb: float | None = None
    sized_by: str = ""


SD15_UNET_PARAMS = 859_520_964  # the UNet of Stable Diffusion 1.5: the calibration point


def unet_activation_gb(unet_params: int, resolution: int, images: int, checkpointing: bool,
                       inference: bool = False) -> float:
    """UNet activations (GB), calibrated on SD 1.5: 2.5 GB per 512 px training image with gradient
    checkpointing, 10 GB without, 0.6 GB at inference; scaled by resolution^2, images, UNet size."""
    scale = (resolution / 512) ** 2 * images * (unet_params / SD15_UNET_PARAMS)
    per_image = 0.6 if inference else (2.5 if checkpointing else 10.0)
    return per_image * scale


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
    settings_class: ClassVar[type[BaseModel] | None] = None  # its section, generator.<section>
    section_name: ClassVar[str | None] = None  # None = type_name (masked_dreambooth: dreambooth's)

    def __init__(self, section: Any, sampler: Sampler, services: Services | None = None, device: Any = None):
        """``section``: its own settings section (None when it has none); ``sampler``: the shared
        sampler section; ``services``: data root, endpoint, shared images; ``device``: None = GPU
        if present."""
        self.section = section
        self.sampler = sampler
        self.services = services or Services()
        self.device = device

    @classmethod
    def create(cls, section: Any, sampler: Sampler, services: Services, category: str,
               stage: str) -> "PersonalizedGenerator":
        """The factory the pipeline uses: a generator for one instance of ``category``, at
        ``stage`` (``generator_prep`` or ``synthesis``). Override to read shared inputs
        (DreamBooth's class images, cut-and-paste's backgrounds) from ``services``."""
        return cls(section, sampler, services)

    @classmethod
    def from_settings(cls, settings: Any, device: Any = None, **services: Any) -> "PersonalizedGenerator":
        """Built from full settings (scripts and tests): its section, the sampler, ``services``."""
        services.setdefault("s3_endpoint", settings.storage.s3_endpoint)
        return cls(section_of(cls, settings), Sampler.of(settings), Services(**services), device)

    @classmethod
    def synthesis_settings(cls, section: Any) -> dict[str, Any]:
        """The settings of its section, beyond the rows and the sampler, that change what a
        synthesis unit draws (they enter its key). Default: none."""
        return {}

    @classmethod
    def template_prompt(cls, section: Any, sampler: Sampler, category: str) -> str:
        """A positive's prompt for caption source ``template`` (or a type that uses no captions)."""
        return sampler.instance_prompt.format(category=category)

    @classmethod
    def shared_input(cls, kind: str, section: Any, sampler: Sampler, category: str) -> SharedInput | None:
        """The per-category base-model images of ``kind`` (one of ``capabilities.shared_inputs``)
        this type reads with these settings, or None when it reads none."""
        return None

    @classmethod
    def draw_shared(cls, kind: str, spec: SharedInput, category: str, section: Any,
                    sampler: Sampler) -> list[Image.Image]:
        """Draw the images of :meth:`shared_input` (the pipeline publishes them once per category)."""
        raise NotImplementedError(f"{cls.__name__} declares no shared input {kind!r}")

    @classmethod
    def prep_memory(cls, section: Any, sampler: Sampler, on_gpu: bool,
                    diffusion_params: Callable[[], dict[str, int]]) -> MemoryNeed:
        """Host memory one generator-prep unit needs (``diffusion_params()``: the base model's
        parameter counts by component, built on the meta device). Default: nothing beyond the
        process (the memory plan adds it)."""
        return MemoryNeed({})

    @classmethod
    def check_inputs(cls, section: Any, resolve: Callable[[str], str], s3_endpoint: str | None) -> None:
        """Pre-flight: raise a one-line :class:`~persrep.errors.ConfigError` when a path its section
        names is unusable (``resolve``: ``@data/x`` -> a path or URI). Default: nothing to check."""

    @classmethod
    def uses_base_model(cls, section: Any) -> bool:
        """Whether it draws from the diffusion base model with these settings (pre-flight then
        checks the model). Default: its capabilities' ``needs_base_model``."""
        return cls.capabilities.needs_base_model

    @classmethod
    def device_notes(cls, section: Any, cuda: bool | None = None) -> list[str]:
        """One warning line per setting of its section that needs a GPU and cannot apply on this
        machine (``cuda``: None = look). Default: none."""
        return []

    def settings_for_key(self) -> dict[str, Any]:
        """The settings that determine this type's artifact (override to narrow or widen)."""
        return {"base_model": self.sampler.base_model}

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
    if cls.settings_class is not None:  # its section enters the settings schema
        add_generator_section(section_key(cls), cls.settings_class)
    if cls.capabilities.trains_per_instance != cls.needs_training:  # one truth: needs_training
        cls.capabilities = replace(cls.capabilities, trains_per_instance=cls.needs_training)
    return cls


def unregister_generator(name: str) -> None:
    """Forget a type registered at run time, and the section it added (tests clean up with this)."""
    cls = GENERATORS._items.get(name)
    GENERATORS.remove(name)
    if cls is not None and cls.settings_class is not None:
        remove_generator_section(section_key(cls))


def section_key(cls: type[PersonalizedGenerator]) -> str | None:
    """The name of the type's section under ``generator.`` (None: it has none)."""
    if cls.settings_class is None and cls.section_name is None:
        return None
    return cls.section_name or cls.type_name


def section_of(cls: type[PersonalizedGenerator], settings: Any) -> Any:
    """The type's own settings section from full settings (its defaults when the settings were
    built before the type registered), or None when it declares none."""
    name = section_key(cls)
    if name is None:
        return None
    section = getattr(settings.generator, name, None)
    if section is None:
        section = (cls.settings_class or GENERATOR_SECTIONS.get(name))()
    return section


def generator_for(ctx: GeneratorContext, type_name: str, category: str, stage: str,
                  device: Any = None) -> PersonalizedGenerator:
    """The pipeline's factory: the type's generator for one instance of ``category`` at ``stage``,
    given its section, the sampler and the services read from ``ctx``."""
    cls = generator_class(type_name)
    settings = ctx.settings
    services = Services(ctx.data_path, settings.storage.s3_endpoint, ctx.shared_images)
    gen = cls.create(section_of(cls, settings), Sampler.of(settings), services, category, stage)
    gen.device = device if device is not None else gen.device
    return gen


def uses_base_model(settings: Any) -> bool:
    """Whether a configured generator type draws from the diffusion base model (its own say)."""
    return any(cls.uses_base_model(section_of(cls, settings))
               for cls in map(generator_class, settings.generator.types))


def device_notes(settings: Any, cuda: bool | None = None) -> list[str]:
    """The configured types' GPU-only settings that cannot apply here, one warning each (a
    section shared by two types is read once)."""
    notes: list[str] = []
    seen: set[Any] = set()
    for type_name in settings.generator.types:
        cls = generator_class(type_name)
        if section_key(cls) in seen:
            continue
        seen.add(section_key(cls))
        notes += [n for n in cls.device_notes(section_of(cls, settings), cuda) if n not in notes]
    return notes


def synthesis_key_settings(type_name: str, settings: Any) -> dict[str, Any]:
    """What the type's section adds to its synthesis units' keys (:meth:`synthesis_settings`)."""
    cls = generator_class(type_name)
    return cls.synthesis_settings(section_of(cls, settings))


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


def get_generator(type_name: str, settings: Any, device: Any = None, **services: Any) -> PersonalizedGenerator:
    """Build the generator registered as ``type_name`` from full settings (scripts and tests):
    its section, the sampler and ``services`` (:class:`Services` fields)."""
    return generator_class(type_name).from_settings(settings, device, **services)


def instance_data_key(instance: InstanceData) -> str:
    """Identity of an instance's inputs: name, category, and its images' and masks' pixels."""
    masks = [image_fingerprint(m) for m in instance.train_masks] if instance.train_masks else None
    return content_key({"name": instance.name, "category": instance.category,
                        "images": [image_fingerprint(i) for i in instance.train_images], "masks": masks})

