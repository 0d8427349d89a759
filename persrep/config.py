"""Typed settings: one section per stage, named YAML configurations, ``key.sub=value`` overrides.

Every run is described by one :class:`Settings` object. It is loaded from a named configuration
shipped in ``persrep/configs/`` (``local``, ``offline-real``, ``paper``) or a YAML file path, then
patched by command-line overrides. Any unknown key, wrong type or out-of-range value fails here,
before compute, with one line per problem naming the key, the bad value and what is allowed.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

from persrep.errors import ConfigError  # noqa: F401 (re-exported)
from persrep.hashing import sha256_hex
from persrep.registry import GENERATOR_SECTIONS, GENERATORS, SEGMENTERS, TASKS  # bottom layer
from persrep.sections import Section, ordered_range  # noqa: F401 (Section re-exported: the base of every section)

GeneratorType = str  # a name registered in persrep.registry.GENERATORS (checked below)
GlobalFeature = Literal["cls", "cls+mean"]
Task = str  # a name registered in persrep.registry.TASKS (checked below)


# ---------------------------------------------------------------------------------------------
# data
class ToySettings(Section):
    """The procedural toy world (``persrep data toy``): the embedded default data set."""

    seed: int = 0
    categories: int = Field(4, ge=1, le=8)
    instances_per_category: int = Field(5, ge=1, le=50)
    image_size: int = Field(128, ge=32, le=1024)
    train_per_instance: int = Field(3, ge=1, le=20)
    test_per_scene: int = Field(3, ge=1, le=100, description="test images per instance per scene")
    dense_per_instance: int = Field(2, ge=0, le=50)
    negatives_per_category: int = Field(20, ge=0, le=1000)


class DataSettings(Section):
    path: str = Field("toy", description="data set dir or s3:// URI in the reference layout, "
                      "a PODS parquet dir, or 'toy' (generated into the storage root)")
    instances: list[str] | None = Field(None, description="evaluate/personalise only these")
    max_instances: int | None = Field(None, ge=1)
    split: Literal["all", "val", "test"] = "all"
    toy: ToySettings = ToySettings()


# ---------------------------------------------------------------------------------------------
# generator prep
class SegmentationSettings(Section):
    """The segmenter (``persrep/segmentation/``): automatic masks and the filter's PerSAM step."""

    segmenter: str = Field("grabcut", description="a registered segmenter: grabcut, sam, persam")
    model: str = Field("none", description="SAM/PerSAM: a model id (e.g. facebook/sam-vit-base), a "
                       "local directory, or 'tiny' (random, from config: tests); unused by grabcut")
    init: Literal["box", "prior", "auto"] = Field("box", description="grabcut start: centred box, a "
                                                  "feature prior (offline EfficientNet-Lite0), or "
                                                  "auto: both, the more confident mask kept")
    margin: float = Field(0.02, ge=0, lt=0.5, description="centred box: fraction cut off each side "
                          "(COIL: 0.02 -> IoU 0.91, 0.08 -> 0.79; bench/masks.json)")
    iterations: int = Field(5, ge=1, le=50)
    max_side: int = Field(256, ge=32, le=2048, description="grabcut works at this size (speed)")
    min_confidence: float = Field(0.5, ge=0, le=1, description="below: the command and the run warn")

    @field_validator("segmenter")
    @classmethod
    def _registered(cls, v: str) -> str:
        SEGMENTERS.check([v])
        return v


class GeneratorSettings(Section):
    """The generator types, the base model, and one section per generator type that declares one
    (``generator.<section>``: added from :data:`persrep.registry.GENERATOR_SECTIONS` below, and by
    :func:`add_generator_section` when a type registers at run time)."""

    types: list[GeneratorType] = Field(["real_only"], min_length=1)
    base_model: str = Field("tiny", description="'tiny' (random, from config), a model id "
                            "(e.g. runwayml/stable-diffusion-v1-5) or a local diffusers directory")
    auto_masks: bool = Field(False, description="data without train masks: predict them in the run "
                             "(keyed unit per instance, settings in `segmentation`) before generator prep")

    @field_validator("types")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate generator types in {v}")
        GENERATORS.check(v)
        return v


# ---------------------------------------------------------------------------------------------
# synthesis
class FilterSettings(Section):
    enabled: bool = False
    scorer: Literal["lpips", "embedding", "dreamsim"] = "lpips"
    threshold: float = Field(0.6, ge=-1, le=1)
    max_attempts_per_image: int = Field(10, ge=1, le=10_000)
    # what a unit whose filter keeps too few positives does (docs/DESIGN.md "Honest units"):
    # not in the unit's key (it does not change the rows drawn); applied where the rows are used
    min_kept_fraction: float = Field(0.5, ge=0, le=1, description="a positives unit must keep "
                                     "at least this fraction of its requested images")
    on_empty: Literal["fail", "real_only"] = Field("fail", description="below min_kept_fraction: "
                                                   "'fail' the unit, or train on the real photos, labelled real_only_fallback")
    segmenter: str = Field(
        "none", description="segment each generated image (PerSAM in the paper, the instance's train "
        "images + masks as reference) and crop to its box; 'none' = the generator's own mask")

    @field_validator("segmenter")
    @classmethod
    def _registered(cls, v: str) -> str:
        if v != "none":
            SEGMENTERS.check([v], "synthesis.filter.segmenter, or 'none'")
        return v


class LLMCaptionSettings(Section):
    """``synthesis.caption_sources: [llm]``: captions written by a language model, once per
    (category, model, instruction, seed), shared by the category's instances (persrep/captions/)."""

    model: str | None = Field(None, description="transformers model id or local directory "
                              "(causal or seq2seq: Flan-T5, any chat model)")
    endpoint: str | None = Field(None, description="OpenAI-compatible base URL (used instead of "
                                 "a local model); the key comes from $<api_key_env>, never logged")
    api_key_env: str = "OPENAI_API_KEY"
    per_category: int = Field(100, ge=1, le=10_000)
    instruction: str | None = Field(None, description="None = the built-in instruction; "
                                    "{category} and {focus} are filled in")
    seed: int = 0
    batch_size: int = Field(8, ge=1, le=1024)
    max_new_tokens: int = Field(48, ge=4, le=1024)
    temperature: float = Field(1.0, gt=0, le=5)
    top_p: float = Field(0.95, gt=0, le=1)
    max_rounds: int | None = Field(None, ge=1, le=100_000, description="None = 5 x the rounds needed")
    min_words: int = Field(4, ge=1, le=200)
    max_words: int = Field(40, ge=2, le=500)
    insert_identifier: bool = Field(True, description="insert <new1> before the category word "
                                    "when the model wrote the category without it")

    @model_validator(mode="after")
    def _words(self) -> "LLMCaptionSettings":
        if self.min_words > self.max_words:
            raise ValueError(f"min_words {self.min_words} > max_words {self.max_words}: no caption can pass")
        return self


class SynthesisSettings(Section):
    num_positives: int = Field(450, ge=0, le=100_000)
    num_negatives_per_category: int = Field(450, ge=0, le=100_000)
    cfg: list[float] = Field([5.0], min_length=1)
    caption_sources: list[Literal["template", "captions", "prompts", "llm"]] = Field(["template"], min_length=1)
    captions_file: str | None = None
    captions: LLMCaptionSettings = LLMCaptionSettings()
    prompts: list[str] | None = Field(None, description="user prompts for caption source 'prompts': "
                                      "each names the object with <new1>; {category} is filled in")
    inference_steps: int = Field(50, ge=1, le=1000)
    scheduler: Literal["pndm", "ddim", "dpm", "euler"] = "pndm"
    resolution: int = Field(512, ge=32, le=2048)
    batch_size: int = Field(8, ge=1, le=256)
    seed: int = 0
    rows_per_shard: int = Field(64, ge=1, le=100_000)
    max_row_errors: int = Field(0, ge=0, description="a synthesis unit with more rows that failed "
                                "to generate (after each was retried alone) is failed, not done")
    filter: FilterSettings = FilterSettings()

    @field_validator("prompts")
    @classmethod
    def _prompts(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            if not v:
                raise ValueError("empty list: give at least one prompt, or leave it unset")
            missing = [p for p in v if "<new1>" not in p]
            if missing:
                raise ValueError(f"prompt {missing[0]!r} lacks the identifier <new1> "
                                 "(e.g. 'a <new1> {category} on a desk')")
        return v

    @field_validator("cfg")
    @classmethod
    def _cfg(cls, v: list[float]) -> list[float]:
        for g in v:
            if not (0.0 <= g <= 30.0):
                raise ValueError(f"guidance scale {g} out of range: allowed 0 <= cfg <= 30 "
                                 "(the paper uses 4, 5, 7.5)")
        return v


# ---------------------------------------------------------------------------------------------
# personalisation
class BackboneSettings(Section):
    name: str = Field(..., description="timm model name, e.g. vit_base_patch14_dinov2")
    weights: str = Field("offline", description="'offline' (packaged EfficientNet-Lite0), "
                         "'tiny' (random), 'none' (timm init), a hub model id, or a local dir/file")
    image_size: int = Field(224, ge=16, le=2048)


class LoraSettings(Section):
    rank: int = Field(16, ge=1, le=512)
    alpha: float = Field(0.5, gt=0)
    dropout: float = Field(0.3, ge=0, lt=1)
    target_modules: list[str] | None = Field(None, min_length=1, description="None = qkv for ViTs, the last "
                                             "blocks' pointwise convs for CNNs")


class HardNegativeSettings(Section):
    """Negatives made from the instance's own images (no other object needed, never in-pool)."""

    recolour: int = Field(0, ge=0, le=100_000, description="identity-destroying edits added to the "
                          "negatives: copies of the instance's photos and positives with the hue turned "
                          "by at least min_hue_shift degrees (a differently coloured object is another "
                          "object: a red vs a green pepper, two cartons of one brand); 0 = none")
    min_hue_shift: float = Field(60.0, gt=0, le=180, description="smallest hue turn of a recoloured "
                                 "negative, in degrees (lighting moves hue far less)")
    context: int = Field(0, ge=0, le=100_000, description="up to this many negatives showing the "
                         "train photos' surroundings: seeded crops beside the object (its mask, given "
                         "or predicted), less those the starting model sees as the object itself; "
                         "pushes the hand, shelf or table out of the features; needs train masks "
                         "(given, or generator.auto_masks); 0 = none")


class PersonalizationSettings(Section):
    backbones: list[BackboneSettings] = Field(
        [BackboneSettings(name="tf_efficientnet_lite0", weights="offline")], min_length=1)
    feature: GlobalFeature = "cls+mean"
    lora: LoraSettings = LoraSettings()
    learning_rate: float = Field(3e-4, gt=0, le=1.0)
    betas: tuple[float, float] = (0.5, 0.999)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(16, ge=1, le=4096)
    epochs: int = Field(2, ge=1, le=1000)
    num_triplets: int = Field(4500, ge=1)
    num_positives: int = Field(450, ge=1)
    max_steps: int | None = Field(None, ge=1, description="cap on optimiser steps (None = epochs)")
    temperature: float = Field(0.07, gt=0, le=10)
    loss: Literal["infonce", "infonce_symmetric"] = "infonce"
    negatives: Literal["generated", "external", "in_pool"] = Field(
        "generated", description="'in_pool' draws from evaluated instances: leaks (docs/PROTOCOL.md)")
    external_negatives: str | None = None
    checkpoint_every: int = Field(100, ge=1)
    seed: int = 1234
    hard_negatives: HardNegativeSettings = HardNegativeSettings()
    real_positive_share: float = Field(0.0, ge=0, le=1, description="share of triplets whose positive "
                                       "is one of the real photos (augmented) instead of a synthetic "
                                       "positive; real-only training ignores it")
    crop_scale: tuple[float, float] = Field((0.8, 1.0), description="training augmentation: "
                                            "RandomResizedCrop area range (the reference: 0.8-1.0)")
    channels_last: bool = Field(False, description="train CNNs in channels_last memory format: "
                                "~1.7x faster steps on CPU (bench/per_instance.json); same maths, "
                                "float rounding differs (not bit-identical), so off by default")

    @field_validator("crop_scale")
    @classmethod
    def _crop(cls, v: tuple[float, float]) -> tuple[float, float]:
        return ordered_range(v, 1, " (a share of the image's area)")


# ---------------------------------------------------------------------------------------------
# evaluation, tracking, resources, storage
class EvaluationSettings(Section):
    tasks: list[Task] = Field(["classification", "retrieval", "detection", "segmentation"],
                              min_length=1)
    global_feature: GlobalFeature = "cls"
    dense_input_size: int = Field(896, ge=32, le=4096)
    dense_features: Literal["hypercolumn", "last"] = Field(
        "hypercolumn", description="CNN dense features: 'hypercolumn' = the stride-16 stage and the "
        "last map (upsampled), each L2-normalised, concatenated; 'last' = the last map only. ViTs: "
        "patch tokens either way (docs/DESIGN.md, dense head)")
    batch_size: int = Field(32, ge=1, le=4096)
    evaluate_pretrained: bool = True
    adapter_scale: float = Field(1.0, ge=0, le=1, description="weight of the adapter at inference "
                                 "(WiSE-FT style interpolation between the pretrained weights, 0, and "
                                 "the trained adapter, 1): the LoRA update is scaled by it")
    pretrained_share: float = Field(0.0, ge=0, le=1, description="share of the pretrained model in a "
                                    "personalised model's global feature (output-space WiSE-FT, "
                                    "persrep/models/blend.py): every cosine score becomes (1 - share) x the "
                                    "adapter's + share x the pretrained one; 0 = the adapter alone")
    global_input_size: int | None = Field(
        None, ge=32, le=4096, description="input size of the global tasks (classification, retrieval) "
        "and of persrep find: centre crop of this many pixels; None = the backbone's image_size (its "
        "training size). A model trained on small crops often recognises better at a larger test "
        "size (EfficientNet-Lite0, pretrained at 224, trained here at 160: bench/tta_study.json)")
    prefix_cache: bool = Field(True, description="CNN adapters leave the stem and first blocks "
                               "frozen: embed the pools through them once per process, run only the "
                               "adapted tail per adapter (same features; false = the full forward)")

    @field_validator("tasks")
    @classmethod
    def _registered(cls, v: list[str]) -> list[str]:
        TASKS.check(v)
        return v


class TrackingSettings(Section):
    enabled: bool = True
    uri: str | None = Field(None, description="None = sqlite:///<storage root>/mlflow.db or "
                            "$MLFLOW_TRACKING_URI")
    experiment: str = "persrep"
    required: bool = False


class MemorySettings(Section):
    """Host memory (GiB) each heavy unit reserves through Ray's ``memory`` resource; None = the
    estimate of :mod:`persrep.pipeline.memory` (from parameter counts, optimiser, resolution, batch)."""

    generator_prep: float | None = Field(None, gt=0, le=4096)
    synthesis: float | None = Field(None, gt=0, le=4096)
    personalization: float | None = Field(None, gt=0, le=4096)
    evaluation: float | None = Field(None, gt=0, le=4096)


class ResourcesSettings(Section):
    num_cpus: int | None = Field(None, ge=1)
    num_gpus: int | None = Field(None, ge=0)
    cpus_per_actor: float = Field(0.5, gt=0, le=64)
    cpus_per_trial: float = Field(1.0, gt=0, le=64)
    gpus_per_trial: float = Field(1.0, ge=0, le=8)
    max_retries: int = Field(2, ge=0, le=20)
    max_concurrent_trials: int | None = Field(None, ge=1)
    data_parallel_workers: int = Field(0, ge=0, le=512, description="> 1: each personalisation "
                                       "trial trains data-parallel over this many workers (TorchTrainer)")
    memory_gb: MemorySettings = MemorySettings()
    gpus_per_tune_trial: float | None = Field(None, gt=0, le=8, description="GPUs of one personalisation "
                                              "trial on Tune (fractions pack several per GPU); None = gpus_per_trial")
    tune_report_every: int = Field(1, ge=1, le=100_000, description="a personalisation trial reports every "
                                   "n-th training step to Tune (checkpoints and the last step always); each report "
                                   "costs driver time (docs/SCALING.md)")
    tune_checkpoints_to_keep: int | None = Field(None, ge=1, description="Tune checkpoints kept per "
                                                 "personalisation trial; None = all (a few), never a forced "
                                                 "experiment snapshot (docs/SCALING.md)")

    @property
    def tune_trial_gpus(self) -> float:
        """GPUs one personalisation trial on Tune reserves: ``gpus_per_tune_trial``, else ``gpus_per_trial``."""
        return self.gpus_per_trial if self.gpus_per_tune_trial is None else self.gpus_per_tune_trial


class StorageSettings(Section):
    root: str = Field("runs/local", description="local path or s3://bucket/prefix")
    s3_endpoint: str | None = Field(None, description="None = $AWS_ENDPOINT_URL or AWS default")

    @field_validator("root")
    @classmethod
    def _root(cls, v: str) -> str:
        from persrep.storage import validate_root_uri

        validate_root_uri(v)
        return v


class Settings(Section):
    name: str = "custom"
    data: DataSettings = DataSettings()
    # a factory, not an instance: a generator section added later is in every new Settings
    generator: GeneratorSettings = Field(default_factory=lambda: GeneratorSettings())
    synthesis: SynthesisSettings = SynthesisSettings()
    personalization: PersonalizationSettings = PersonalizationSettings()
    evaluation: EvaluationSettings = EvaluationSettings()
    tracking: TrackingSettings = TrackingSettings()
    resources: ResourcesSettings = ResourcesSettings()
    storage: StorageSettings = StorageSettings()
    segmentation: SegmentationSettings = SegmentationSettings()

    _notes: list[str] = PrivateAttr(default_factory=list)  # what migrate_settings did (one line each)

    @model_validator(mode="wrap")
    @classmethod
    def _migrate(cls, data: Any, handler: Any) -> "Settings":
        notes = migrate_settings(data) if isinstance(data, dict) else []
        settings = handler(data)
        if notes and isinstance(settings, Settings):
            settings._notes = [*settings._notes, *notes]
        return settings

    @property
    def notes(self) -> list[str]:
        """One line per old spelling this object was read from (the run prints them)."""
        return list(self._notes)

    @model_validator(mode="after")
    def _cross_checks(self) -> "Settings":
        if "captions" in self.synthesis.caption_sources and not self.synthesis.captions_file:
            raise ValueError("synthesis.caption_sources contains 'captions' but "
                             "synthesis.captions_file is not set: give a JSON file keyed by "
                             "category, or use caption_sources=[template]")
        if "prompts" in self.synthesis.caption_sources and not self.synthesis.prompts:
            raise ValueError("synthesis.caption_sources contains 'prompts' but synthesis.prompts "
                             "is not set: give a list like ['a <new1> {category} on a desk']")
        llm = self.synthesis.captions
        if "llm" in self.synthesis.caption_sources and not (llm.model or llm.endpoint):
            raise ValueError("synthesis.caption_sources contains 'llm' but neither "
                             "synthesis.captions.model nor synthesis.captions.endpoint is set: give "
                             "a model id or local directory (e.g. google/flan-t5-large)")
        if self.personalization.negatives == "external" and not self.personalization.external_negatives:
            raise ValueError("personalization.negatives=external needs "
                             "personalization.external_negatives (a folder of images)")
        return self


# ---------------------------------------------------------------------------------------------
# the generator sections: assembled from the registry
def add_generator_section(name: str, section: type[BaseModel]) -> None:
    """Make ``generator.<name>`` a section of the schema (every Settings built from now on has it,
    its defaults when not given). Adding the same class again is a no-op."""
    field = GeneratorSettings.model_fields.get(name)
    if field is not None and field.annotation is section:
        return
    if field is not None and name not in GENERATOR_SECTIONS:
        raise ValueError(f"generator.{name} is a setting, not a generator section; pick another name")
    GENERATOR_SECTIONS.add(name, section)
    GeneratorSettings.model_fields[name] = FieldInfo(annotation=section, default_factory=section)
    _rebuild()


def remove_generator_section(name: str) -> None:
    """Forget a section added by :func:`add_generator_section` (tests that register a type)."""
    if name in GeneratorSettings.model_fields and name in GENERATOR_SECTIONS and \
            name not in GENERATOR_SECTIONS.builtin:
        del GeneratorSettings.model_fields[name]
        GENERATOR_SECTIONS.remove(name)
        _rebuild()


def _rebuild() -> None:
    GeneratorSettings.model_rebuild(force=True)
    Settings.model_rebuild(force=True)


for _name in GENERATOR_SECTIONS.names():  # the built-in sections (light modules, pydantic only)
    add_generator_section(_name, GENERATOR_SECTIONS.get(_name))


# ---------------------------------------------------------------------------------------------
# old spellings (a settings file or an override written before a section moved)
MOVED: dict[tuple[str, ...], tuple[str, ...]] = {
    ("synthesis", "cut_paste"): ("generator", "cut_paste"),  # issue 28: components own their sections
}


def _moved_note(old: tuple[str, ...], new: tuple[str, ...]) -> str:
    return (f"settings: {'.'.join(old)} is now {'.'.join(new)}; read from the old place "
            f"(write {'.'.join(new)} to silence this note)")


def migrate_path(path: list[str]) -> tuple[list[str], str | None]:
    """An override's key path in its current place, and the note when it moved."""
    for old, new in MOVED.items():
        if tuple(path[:len(old)]) == old:
            return [*new, *path[len(old):]], _moved_note(old, new)
    return path, None


def migrate_settings(data: dict[str, Any]) -> list[str]:
    """Move sections of ``data`` (raw settings) from an old place to their current one, in place;
    values already at the new place win. Returns one note per moved section."""
    notes = []
    for old, new in MOVED.items():
        parent = data.get(old[0])
        if not isinstance(parent, dict) or old[1] not in parent:
            continue
        value = parent.pop(old[1])
        target = data.setdefault(new[0], {})
        if isinstance(target, BaseModel):
            target = data[new[0]] = target.model_dump()
        if not isinstance(target, dict):
            raise ConfigError(f"settings: {'.'.join(new[:1])} is a value, not a section")
        current = target.get(new[1])
        if isinstance(value, dict) and isinstance(current, dict):
            value = {**value, **current}
        elif current is not None:
            value = current
        target[new[1]] = value
        notes.append(_moved_note(old, new))
    return notes


# ---------------------------------------------------------------------------------------------
# loading
def available_configs() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("persrep.configs").iterdir()
                  if p.name.endswith(".yaml"))


def _read_yaml(name_or_path: str) -> tuple[dict[str, Any], str]:
    path = Path(name_or_path)
    if name_or_path.endswith((".yaml", ".yml")) or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {name_or_path}: not found")
        text, origin = path.read_text(), str(path)
    else:
        res = resources.files("persrep.configs") / f"{name_or_path}.yaml"
        if not res.is_file():
            raise ConfigError(f"config {name_or_path!r}: no such named configuration; "
                              f"choose one of {available_configs()} or give a .yaml path")
        text, origin = res.read_text(), f"persrep/configs/{name_or_path}.yaml"
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}: not valid YAML: {exc}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: top level must be a mapping of sections, got {type(data).__name__}")
    return data, origin


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a","b","c"], value); the value is parsed as YAML (``[4,5]``, ``1e-4``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.sub=value, e.g. synthesis.cfg=[4,5]")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key part; expected key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _apply(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part} is a value, not a section")
        node = child
    node[path[-1]] = value


def _format_errors(exc: ValidationError, origin: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
        bad = err.get("input")
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check spelling; `persrep config show` lists every key)"
        shown = json.dumps(bad, default=str) if not isinstance(bad, dict) else "{...}"
        lines.append(f"settings error ({origin}): {loc or '<root>'} = {shown[:80]}: {msg}")
    return "\n".join(lines)


def load_settings(config: str = "local", overrides: list[str] | tuple[str, ...] = ()) -> Settings:
    """Load a named configuration (or a YAML path) and apply ``key.sub=value`` overrides."""
    data, origin = _read_yaml(config)
    notes = migrate_settings(data)  # the file's old spellings, before overrides (which win)
    for text in overrides:
        path, value = parse_override(text)
        path, note = migrate_path(path)
        if note and note not in notes:
            notes.append(note)
        _apply(data, path, value)
    if overrides:
        origin += " + overrides"
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, origin)) from None
    settings._notes = [*notes, *(n for n in settings._notes if n not in notes)]
    return settings


def settings_to_dict(obj: BaseModel | dict[str, Any]) -> dict[str, Any]:
    return obj.model_dump(mode="json") if isinstance(obj, BaseModel) else dict(obj)


def flatten(obj: BaseModel | dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists kept as JSON strings): for MLflow params."""
    out: dict[str, Any] = {}
    for k, v in settings_to_dict(obj).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list) else v
    return out


def content_key(*parts: BaseModel | dict[str, Any] | str | int | float | None, length: int = 16) -> str:
    """A stable key for a settings subset plus input keys: the identity of a unit of work.

    The same parts (by value, in order) always give the same key, across processes and machines;
    dict key order does not matter. Used as ``<storage_root>/<stage>/<key>/``.
    """
    canon = [settings_to_dict(p) if isinstance(p, (BaseModel, dict)) else p for p in parts]
    blob = json.dumps(canon, sort_keys=True, separators=(",", ":"), default=str)
    return sha256_hex(blob, length)
