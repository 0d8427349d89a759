"""The LLM captions stage (``synthesis.caption_sources: [llm]``): one keyed unit per category.

Runs before generator prep and synthesis (``run_data_stages``): each unit writes the category's
captions (``captions/<key>/captions.json``, ``{category: [...]}``) with the model or endpoint of
``synthesis.captions``; every instance of the category, and its negatives (identifier removed),
draw their prompts from it. The key hashes what changes the captions: the category, the model's
identity (id, or a local directory's files), the instruction, the seed and the sampling and
validation settings (not ``max_rounds`` or the API key's variable). A re-run, another run or a
sweep with the same key reuses the captions. No Ray here: the executor decides where units run.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persrep.config import content_key
from persrep.pipeline.context import RunContext
from persrep.pipeline.planned import PlannedStage, StageScope
from persrep.pipeline.units import CAPTION_AREA, Unit

STAGE = CAPTION_AREA
CAPTIONS_FILE = "captions.json"
_NOT_IN_KEY = ("model", "endpoint", "api_key_env", "max_rounds", "instruction")


def uses_llm(settings: Any) -> bool:
    return "llm" in settings.synthesis.caption_sources


def caption_key(settings: Any, category: str) -> str:
    from persrep.captions.backends import model_identity
    from persrep.captions.generate import instruction_of

    cfg = settings.synthesis.captions
    ident = ({"endpoint": cfg.endpoint, "model": cfg.model} if cfg.endpoint
             else model_identity(cfg.model or ""))
    sampling = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in _NOT_IN_KEY}
    return content_key("captions-llm", category, ident, instruction_of(cfg), sampling)


@dataclass(frozen=True, eq=False)
class CaptionUnit(Unit):
    """LLM captions: one category (``model``: a local model directory resolved on the driver)."""

    category: str
    key: str
    model: str | None


def plan_caption_units(ctx: RunContext) -> list[CaptionUnit]:
    """One unit per category of the run's instances (none unless a caption source is ``llm``)."""
    if not uses_llm(ctx.settings):
        return []
    cats = sorted(set(ctx.instances.values()))
    model = ctx.settings.synthesis.captions.model
    if model and Path(model).expanduser().is_dir():  # resolved on the driver: workers start elsewhere
        model = str(Path(model).expanduser().absolute())
    return [CaptionUnit(c, caption_key(ctx.settings, c), model) for c in cats]


def run_caption_unit(ctx: RunContext, unit: CaptionUnit) -> dict[str, Any]:
    """Generate and publish one category's captions (skipped when already published)."""
    from persrep.captions.generate import build_backend, generate_for_category

    key, cat = unit.key, unit.category
    if ctx.storage.is_intact(STAGE, key):
        return {"status": "skipped", "key": key}
    t0 = time.perf_counter()
    cfg = ctx.settings.synthesis.captions.model_copy(update={"model": unit.model})
    caps = generate_for_category(build_backend(cfg), cat, cfg)
    meta = {"category": cat, "model": cfg.endpoint or cfg.model, "n": len(caps),
            "seconds": time.perf_counter() - t0}
    ctx.storage.publish(STAGE, key, {CAPTIONS_FILE: json.dumps({cat: caps}, indent=1).encode()}, meta)
    return {"status": "done", "key": key, "captions": len(caps), "seconds": meta["seconds"]}


def llm_captions(ctx: RunContext) -> dict[str, list[str]] | None:
    """``{category: captions}`` of every published caption unit of the run (None when the run
    has no ``llm`` caption source). A category whose unit is missing (its generation failed) is
    absent: its ``llm`` rows are not planned (the failure is in the captions stage)."""
    if not uses_llm(ctx.settings):
        return None
    out: dict[str, list[str]] = {}
    for u in plan_caption_units(ctx):
        if ctx.storage.is_finished(STAGE, u.key):
            out.update(json.loads(ctx.storage.read_unit_file(STAGE, u.key, CAPTIONS_FILE)))
    return out


def ensure_captions(ctx: RunContext, say: Any = None) -> None:
    """Generate missing caption units in this process (the sweep plans synthesis units, whose
    keys depend on the captions' text, before it has an executor)."""
    for u in plan_caption_units(ctx):
        if not ctx.storage.is_intact(STAGE, u.key):
            if say:
                say(f"captions: generating {u.category} ({u.key})")
            run_caption_unit(ctx, u)


def planned(scope: StageScope) -> PlannedStage:
    """LLM captions: one unit per category, before the synthesis rows are planned."""
    return PlannedStage("captions", lambda: plan_caption_units(scope.ctx), run_caption_unit,
                        lambda u: f"captions:{u.category}")
