"""Generate a captions file: batched, seeded, deduplicated, every caption validated, bounded.

For each category, rounds of ``batch_size`` instructions (each asking for one caption with a
different focus: a place, other objects, the lighting, a person using the object) go to the
backend with a seed derived from (settings seed, category, round). Completions are cleaned and
validated (:mod:`persrep.captions.validate`); duplicates are dropped; rounds repeat until
``per_category`` captions are kept or ``max_rounds`` is spent, then :class:`CaptionError`
says how many were kept and why the others were rejected. The same backend, settings and seed
give the same captions.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from persrep.captions.backends import Backend, CaptionError, EndpointBackend, TransformersBackend
from persrep.captions.validate import Rules, Tally, clean, dedup_key, problem

DEFAULT_INSTRUCTION = (
    "Write one short, vivid photo description of a {category} in a real everyday scene, "
    "focusing on {focus}. Mention the {category} exactly once, as \"<new1> {category}\". "
    "Answer with the description only.")
FOCI = ("the place where it is", "other objects next to it", "the lighting and time of day",
        "a person using it", "the surface it stands on", "the weather or the season")


def build_backend(cfg: Any) -> Backend:
    """A backend from ``synthesis.captions`` settings (endpoint when given, else the model)."""
    if cfg.endpoint:
        return EndpointBackend(cfg.endpoint, cfg.model, cfg.api_key_env)
    if not cfg.model:
        raise CaptionError("synthesis.captions.model is not set: give a model id or a local "
                           "directory (or synthesis.captions.endpoint for a server)")
    return TransformersBackend(cfg.model)


def max_rounds(cfg: Any) -> int:
    return cfg.max_rounds or max(2, math.ceil(5 * cfg.per_category / cfg.batch_size))


def instruction_of(cfg: Any) -> str:
    return cfg.instruction or DEFAULT_INSTRUCTION


def generate_for_category(backend: Backend, category: str, cfg: Any,
                          progress: Callable[[str], None] | None = None) -> list[str]:
    from persrep.hashing import stable_seed

    rules = Rules(cfg.min_words, cfg.max_words, cfg.insert_identifier)
    template = instruction_of(cfg)
    kept: list[str] = []
    seen: set[str] = set()
    tally = Tally()
    rounds = max_rounds(cfg)
    for r in range(rounds):
        prompts = [template.format(category=category, focus=FOCI[(r * cfg.batch_size + j) % len(FOCI)])
                   for j in range(cfg.batch_size)]
        outs = backend.complete(prompts, stable_seed("captions", cfg.seed, category, r),
                                max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                top_p=cfg.top_p)
        for text, prompt in zip(outs, prompts):
            tally.candidates += 1
            cap = clean(text, category, rules.insert_identifier)
            why = problem(cap, prompt, rules)
            if why is None and dedup_key(cap) in seen:
                why = "duplicate"
            if why:
                tally.rejected[why] += 1
                continue
            seen.add(dedup_key(cap))
            kept.append(cap)
        if progress:
            progress(f"captions {category}: round {r + 1}/{rounds}: {len(kept)}/{cfg.per_category} kept")
        if len(kept) >= cfg.per_category:
            return kept[:cfg.per_category]
    raise CaptionError(f"captions for {category!r}: {len(kept)} of {cfg.per_category} valid after "
                       f"{rounds} rounds of {cfg.batch_size} ({tally.candidates} candidates; rejected: "
                       f"{tally.describe()}): use a larger instruction-following model, raise "
                       "max_rounds, or give a captions file (synthesis.captions_file)")


def generate_captions(categories: list[str], cfg: Any, backend: Backend | None = None,
                      progress: Callable[[str], None] | None = None) -> dict[str, list[str]]:
    """``{category: [captions]}`` in the reference format."""
    backend = backend or build_backend(cfg)
    return {c: generate_for_category(backend, c, cfg, progress) for c in categories}


def write_captions_file(captions: dict[str, list[str]], out: str | Path) -> Path:
    """Write atomically (temp file + rename): an interrupted run leaves no half-written file."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(captions, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    return out
