"""What to synthesise: data configurations, prompt sources and the row table.

A *data configuration* is one way of making an instance's positives: (generator type, CFG,
caption source). Types whose capabilities say they use no guidance and no captions
(``real_only``, ``cut_paste``) collapse to one configuration each. Every row carries its own seed
(``stable_seed`` of its identity), so any image can be regenerated alone.

Negatives come from the *base* (un-personalised) generator with the category prompt and never
contain the identifier; there is one negatives pool per (category, CFG, caption source), shared
by every instance of the category and every personalised generator type.

Prompt sources: ``template`` (the generator type's :meth:`~persrep.generation.base.PersonalizedGenerator.template_prompt`:
the run's template instance prompt, :class:`~persrep.generation.base.Sampler`), ``captions`` (a file, below),
``prompts`` (a list given in the settings, ``synthesis.prompts``, ``{category}`` filled in) and
``llm`` (captions written per category by a language model: ``persrep/pipeline/stages/captions.py``
generates them before synthesis; ``build_rows`` gets them as ``llm_captions``).

Captions files (reference format): a JSON object whose keys are instance names (the released
PODS file) or category names (../shared/docs/REFERENCE.md, not in this repository), each a list of
captions containing ``<new1>``, e.g. ``"A <new1> mug on a wooden desk"``. For negatives the
identifier is removed.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from persrep.config import Settings, content_key
from persrep.generation.base import IDENTIFIER, Sampler, SampleRow, generator_caps, generator_class, section_of
from persrep.hashing import stable_seed

NEGATIVE_GENERATOR = "base"
POSITIVES, NEGATIVES = "pos", "neg"  # the two kinds of row group


class PlanError(ValueError):
    pass


@dataclass(frozen=True)
class DataConfig:
    generator: str
    cfg: float | None
    caption_source: str

    @property
    def key(self) -> str:
        return content_key("data-config", asdict(self))

    @property
    def label(self) -> str:
        if self.cfg is None:
            return self.generator
        return f"{self.generator}/cfg{self.cfg:g}/{self.caption_source}"


def data_configs(settings: Settings) -> list[DataConfig]:
    """Every (generator, cfg, caption source) the settings ask for: one per CFG value for types
    that use guidance, one per caption source for types that use captions (their capabilities)."""
    out: list[DataConfig] = []
    for gen in settings.generator.types:
        caps = generator_caps(gen)
        cfgs = [float(c) for c in settings.synthesis.cfg] if caps.uses_guidance else [None]
        sources = list(settings.synthesis.caption_sources) if caps.uses_captions else ["none"]
        out += [DataConfig(gen, cfg, src) for cfg in cfgs for src in sources]
    return out


def row_config(generator: str, cfg: float | None, caption_source: str | None) -> DataConfig:
    """The data configuration a stored positive row belongs to (reports read rows back). A type
    no longer registered counts as guidance-free when its rows carry no CFG."""
    try:
        guided = generator_caps(generator).uses_guidance
    except ValueError:
        guided = cfg is not None and cfg == cfg and cfg != 0.0
    if not guided or cfg is None or cfg != cfg:
        return DataConfig(generator, None, caption_source or "none")
    return DataConfig(generator, float(cfg), caption_source or "none")


class RowGroup(str):
    """One group of rows (one synthesis unit), typed: an instance's positives of one data
    configuration, or a category's negatives pool for one (CFG, caption source).

    It *is* the group's stored name (a ``str``: ``pos:<config key>:<instance>`` /
    ``neg:<cfg>:<source>:<category>``), so summaries, unit labels, ``units.json`` and keys of
    stored runs are unchanged, while code reads its fields instead of splitting the string.
    Immutable; pickles with its fields.
    """

    kind: str  # POSITIVES | NEGATIVES
    owner: str  # the instance (positives) or the category (negatives)
    config: DataConfig | None  # positives
    cfg: float | None  # negatives
    caption_source: str | None  # negatives

    def __new__(cls, kind: str, owner: str, config: DataConfig | None = None, cfg: float | None = None,
                caption_source: str | None = None) -> "RowGroup":
        if kind == POSITIVES and config is not None:
            text = f"{POSITIVES}:{config.key}:{owner}"
        elif kind == NEGATIVES and cfg is not None and caption_source is not None:
            text = f"{NEGATIVES}:{cfg:g}:{caption_source}:{owner}"
        else:
            raise ValueError(f"row group {kind!r} of {owner!r}: positives need a data configuration, "
                             "negatives a cfg and a caption source")
        self = super().__new__(cls, text)
        for name, value in (("kind", kind), ("owner", owner), ("config", config), ("cfg", cfg),
                            ("caption_source", caption_source)):
            object.__setattr__(self, name, value)
        return self

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"RowGroup is immutable (tried to set {name})")

    def __reduce__(self) -> tuple[Any, ...]:
        return (RowGroup, (self.kind, self.owner, self.config, self.cfg, self.caption_source))

    @property
    def is_negatives(self) -> bool:
        return self.kind == NEGATIVES


def negative_configs(settings: Settings) -> list[tuple[float, str]]:
    """(cfg, caption source) pools of negatives needed; diffusion-free configs use the first."""
    pairs = {(float(c.cfg), c.caption_source) for c in data_configs(settings) if c.cfg is not None}
    if not pairs:
        pairs = {(float(settings.synthesis.cfg[0]), settings.synthesis.caption_sources[0])}
    return sorted(pairs)


def load_captions(path: str | Path) -> dict[str, list[str]]:
    p = Path(path)
    if not p.is_file():
        raise PlanError(f"synthesis.captions_file {p}: not found")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PlanError(f"synthesis.captions_file {p}: invalid JSON ({exc})") from None
    if not isinstance(data, dict) or not data:
        raise PlanError(f"synthesis.captions_file {p}: expected a non-empty object "
                        "{instance or category: [captions with <new1>]}")
    for key, caps in data.items():
        if not isinstance(caps, list) or not caps or not all(isinstance(c, str) for c in caps):
            raise PlanError(f"synthesis.captions_file {p}: entry {key!r} must be a non-empty list of strings")
        missing = [c for c in caps if IDENTIFIER not in c]
        if missing:
            raise PlanError(f"synthesis.captions_file {p}: entry {key!r} has captions without the "
                            f"identifier {IDENTIFIER}, e.g. {missing[0]!r}: add it where the object is named")
    return data


def strip_identifier(prompt: str) -> str:
    """``A <new1> mug on a desk`` -> ``A mug on a desk`` (the negative's prompt)."""
    return re.sub(r"\s+", " ", prompt.replace(IDENTIFIER, "")).strip()


def captions_for(captions: dict[str, list[str]], instance: str, category: str) -> list[str]:
    caps = captions.get(instance) or captions.get(category)
    if not caps:
        raise PlanError(f"captions file has no entry for instance {instance!r} or category "
                        f"{category!r}: add one, or use synthesis.caption_sources=[template]")
    return caps


def positive_prompt(settings: Settings, cfg: DataConfig, instance: str, category: str, i: int,
                    captions: dict[str, list[str]] | None) -> str:
    if cfg.caption_source in ("captions", "llm"):
        caps = captions_for(captions or {}, instance, category)
        return caps[i % len(caps)]
    if cfg.caption_source == "prompts":
        user = settings.synthesis.prompts or []
        return user[i % len(user)].replace("{category}", category)
    cls = generator_class(cfg.generator)  # the type's own template (its section, or the run's)
    return cls.template_prompt(section_of(cls, settings), Sampler.of(settings), category)


def negative_prompt(settings: Settings, caption_source: str, category: str, i: int,
                    captions: dict[str, list[str]] | None, instances: list[str]) -> str:
    if caption_source in ("captions", "llm"):
        # any instance of the category has captions describing scenes for it
        pools = [c for n in instances for c in (captions or {}).get(n, [])] or \
            (captions or {}).get(category, [])
        if not pools:
            raise PlanError(f"captions file has no entry for category {category!r} or its instances")
        return strip_identifier(pools[i % len(pools)])
    if caption_source == "prompts":
        user = settings.synthesis.prompts or []
        return strip_identifier(user[i % len(user)].replace("{category}", category))
    prompt = Sampler.of(settings).class_prompt.format(category=category)  # the base model's class prompt
    return strip_identifier(prompt)


def build_rows(settings: Settings, instances: dict[str, str],
               llm_captions: dict[str, list[str]] | None = None) -> dict[str, list[SampleRow]]:
    """The row table, grouped by unit: ``{"pos:<config key>:<instance>" | "neg:<cfg>:<src>:<category>": rows}``
    (the groups' stored names; :func:`build_groups` gives the typed groups).

    ``instances`` maps instance name -> category. Grouping rows by (generator, instance) lets
    an actor load each personalised generator once per group, not once per batch.
    ``llm_captions`` (``{category: captions}``) feeds the ``llm`` caption source; the groups of a
    category it lacks (its captions failed) are left out.
    """
    return {str(g): rows for g, rows in build_groups(settings, instances, llm_captions).items()}


def build_groups(settings: Settings, instances: dict[str, str],
                 llm_captions: dict[str, list[str]] | None = None) -> dict[RowGroup, list[SampleRow]]:
    """:func:`build_rows` with typed :class:`RowGroup` keys (same groups, same order)."""
    syn = settings.synthesis
    captions = load_captions(syn.captions_file) if "captions" in syn.caption_sources else None
    if "llm" in syn.caption_sources and llm_captions is None:
        raise PlanError("synthesis.caption_sources contains 'llm' but no LLM captions were given: "
                        "the captions stage runs before synthesis (run_data_stages)")
    llm = llm_captions or {}
    groups: dict[RowGroup, list[SampleRow]] = {}
    for cfg in data_configs(settings):
        for name in sorted(instances):
            cat = instances[name]
            if cfg.caption_source == "llm" and not llm.get(cat):
                continue  # its category's captions failed: recorded in the captions stage
            rows = []
            for i in range(syn.num_positives):
                prompt = positive_prompt(settings, cfg, name, cat, i,
                                         llm if cfg.caption_source == "llm" else captions)
                seed = stable_seed("pos", cfg.key, name, syn.seed, i)
                rows.append(SampleRow(name, "positive", cfg.generator, prompt,
                                      cfg.cfg if cfg.cfg is not None else 0.0, seed,
                                      cfg.caption_source, i))
            groups[RowGroup(POSITIVES, name, config=cfg)] = rows
    by_cat: dict[str, list[str]] = {}
    for name, cat in instances.items():
        by_cat.setdefault(cat, []).append(name)
    for gcfg, src in negative_configs(settings):
        for cat in sorted(by_cat):
            if src == "llm" and not llm.get(cat):
                continue
            rows = []
            for i in range(syn.num_negatives_per_category):
                prompt = negative_prompt(settings, src, cat, i, llm if src == "llm" else captions,
                                         sorted(by_cat[cat]))
                seed = stable_seed("neg", cat, gcfg, src, syn.seed, i)
                rows.append(SampleRow(f"{cat}_negatives", "negative", NEGATIVE_GENERATOR, prompt,
                                      gcfg, seed, src, i))
            groups[RowGroup(NEGATIVES, cat, cfg=gcfg, caption_source=src)] = rows
    return groups
