"""Every input a run will read, checked before compute: one line naming the setting and the fix.

:func:`persrep.pipeline.context.prepare_run` calls :func:`check_run_inputs` once the data set is
open and the instances are selected, before any unit runs (and before Ray starts). What it checks,
only where the run's settings use it:

- settings that would make every unit of a stage fail the same way: ``synthesis.num_positives=0``
  with a generator type that synthesises positives, ``synthesis.num_negatives_per_category=0``
  with generated negatives;
- ``synthesis.captions_file`` (caption source ``captions``): it exists, is a JSON object of
  captions with ``<new1>``, and covers every selected instance (or its category);
- what each configured generator type's own section names (its ``check_inputs``; cut-and-paste:
  ``generator.cut_paste.backgrounds``, a folder, is a folder holding images);
- ``synthesis.captions.model`` / ``.endpoint`` (caption source ``llm``): a local model directory
  exists with its ``config.json`` (a hub id is in the cache when offline); an endpoint is an
  ``http(s)://`` URL whose host accepts a connection.

The data set (images, masks), the storage root, the backbones' weights, the diffusion base model,
the segmenter and ``personalization.external_negatives`` are checked by the other pre-flight
steps of ``prepare_run``. No Ray here, nothing is computed.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from persrep.errors import ConfigError
from persrep.generation.base import any_generator

ENDPOINT_TIMEOUT_S = 3.0


def check_settings_inputs(settings: Any) -> None:
    """What needs no data set: the counts, the captions file's content, the captions model or
    endpoint, the backbones' local weight files. Runs first in ``prepare_run`` (before the data
    set is generated or checked)."""
    check_counts(settings)
    load_captions_file(settings)
    check_captions_model(settings)
    check_backbone_weight_files(settings)


WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def check_model_source(value: str, setting: str) -> None:
    """A model named by a setting is a hub id (``org/name``), a local path or a keyword: not blank,
    not a URL (nothing loads a model from ``http://`` or ``s3://``)."""
    if not value.strip():
        raise ConfigError(f"{setting} is empty: give a model id (org/name) or a local directory")
    if "://" in value:
        raise ConfigError(f"{setting}={value}: a URL, but models load from a hub id (org/name) or a "
                          "local directory: download it once and give the directory")


def check_backbone_weight_files(settings: Any) -> None:
    """A backbone's ``weights`` that is a local file must be a weights file, not any file."""
    for bs in settings.personalization.backbones:
        p = Path(bs.weights).expanduser()
        if bs.weights not in ("offline", "tiny", "none") and p.is_file() and p.suffix not in WEIGHT_SUFFIXES:
            raise ConfigError(f"personalization.backbones {bs.name}: weights={bs.weights} is a {p.suffix or 'suffix-less'} "
                              f"file, not weights ({', '.join(WEIGHT_SUFFIXES)}): give a weights file, a "
                              "directory with model.safetensors, a hub id, or 'offline'")


def check_run_inputs(settings: Any, instances: dict[str, str], resolve: Any) -> None:
    """What needs the selected instances (name -> category) or the data set's root (``resolve``:
    ``@data/x`` -> a path or URI, ``RunContext.resolve_data_path``): the captions file covers
    every instance, the backgrounds folder holds images."""
    check_captions_cover(settings, instances)
    check_generator_inputs(settings, resolve)


def synthesises_positives(settings: Any) -> bool:
    """Whether a generator type of the run draws synthetic positives (not the real photos)."""
    return any_generator(settings.generator.types, lambda c: not c.positives_are_real)


def check_counts(settings: Any) -> None:
    syn, types = settings.synthesis, settings.generator.types
    if syn.num_positives == 0 and synthesises_positives(settings):
        drawn = [t for t in types if any_generator([t], lambda c: not c.positives_are_real)]
        raise ConfigError(f"synthesis.num_positives=0 but generator types {drawn} train on synthetic "
                          "positives: every adapter would have none; set synthesis.num_positives>=1 "
                          "(the paper: 450), or use generator.types=[real_only]")
    if syn.num_negatives_per_category == 0 and settings.personalization.negatives == "generated":
        raise ConfigError("synthesis.num_negatives_per_category=0 but personalization.negatives=generated: "
                          "every adapter would have no negatives; set it >= 1 (the paper: 450), or use "
                          "personalization.negatives=external with a folder of photos")


def _uses_caption_source(settings: Any, source: str) -> bool:
    from persrep.generation.plan import data_configs

    return any(c.caption_source == source for c in data_configs(settings))


def load_captions_file(settings: Any) -> dict[str, list[str]] | None:
    """The captions file's content (None when caption source ``captions`` is not used)."""
    syn = settings.synthesis
    if "captions" not in syn.caption_sources:
        return None
    from persrep.generation.plan import PlanError, load_captions

    fix = "give a JSON file {instance or category: [captions with <new1>]}, or use caption_sources=[template]"
    if syn.captions_file and Path(syn.captions_file).is_dir():
        raise ConfigError(f"synthesis.captions_file {syn.captions_file}: a folder, not a file: {fix}")
    try:
        return load_captions(syn.captions_file or "")
    except PlanError as exc:
        raise ConfigError(f"{exc}: {fix}") from None
    except (OSError, UnicodeDecodeError) as exc:  # unreadable, not text
        raise ConfigError(f"synthesis.captions_file {syn.captions_file}: cannot read ({exc}): {fix}") from None


def check_captions_cover(settings: Any, instances: dict[str, str]) -> None:
    captions = load_captions_file(settings)
    if captions is None or not _uses_caption_source(settings, "captions"):
        return
    syn = settings.synthesis
    missing = sorted(n for n, cat in instances.items() if not (captions.get(n) or captions.get(cat)))
    if missing:
        raise ConfigError(f"synthesis.captions_file {syn.captions_file}: no entry for instance "
                          f"{missing[0]!r} or its category {instances[missing[0]]!r} ({len(missing)} "
                          "instance(s) without captions): add one per instance or category")


def check_generator_inputs(settings: Any, resolve: Any) -> None:
    """Each configured generator type checks what its own section names (cut-and-paste: its
    backgrounds folder holds images), through its ``check_inputs`` class method."""
    from persrep.generation.base import generator_class, section_key, section_of

    seen: set[Any] = set()
    for type_name in settings.generator.types:
        cls = generator_class(type_name)
        if section_key(cls) not in seen:
            seen.add(section_key(cls))
            cls.check_inputs(section_of(cls, settings), resolve, settings.storage.s3_endpoint)


def _looks_like_path(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or Path(value).expanduser().exists()


def check_captions_model(settings: Any) -> None:
    if "llm" not in settings.synthesis.caption_sources:
        return
    cfg = settings.synthesis.captions
    if cfg.endpoint:
        check_endpoint(cfg.endpoint, "synthesis.captions.endpoint")
        return
    model = cfg.model or ""
    check_model_source(model, "synthesis.captions.model")
    if _looks_like_path(model):
        p = Path(model).expanduser()
        if not p.is_dir() or not (p / "config.json").is_file():
            what = "not found" if not p.exists() else ("a file, not a model directory" if not p.is_dir()
                                                       else "no config.json in it")
            raise ConfigError(f"synthesis.captions.model={model}: {what}: give a directory written by "
                              "save_pretrained, or a model id in the Hugging Face cache")
    elif os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(model, "config.json"), str):
            raise ConfigError(f"synthesis.captions.model={model}: not in the Hugging Face cache and "
                              "HF_HUB_OFFLINE is set: download it once (huggingface-cli download "
                              f"{model}) or give a local directory")


def check_endpoint(url: str, setting: str) -> None:
    """An ``http(s)://host[:port]`` whose host accepts a TCP connection within a few seconds."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(f"{setting}={url}: not an http(s) URL: give e.g. http://localhost:8000/v1")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=ENDPOINT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise ConfigError(f"{setting}={url}: cannot connect to {parsed.hostname}:{port} ({exc}): "
                          "start the server or fix the URL") from None
