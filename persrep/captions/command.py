"""``persrep captions generate``: its options and what it does (the CLI only registers it)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from pydantic import ValidationError

from persrep.config import ConfigError, LLMCaptionSettings

_FIELDS = ("model", "endpoint", "api_key_env", "per_category", "seed", "batch_size",
           "max_new_tokens", "temperature", "max_rounds", "instruction")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--categories", required=True, help="comma-separated, e.g. mug,shoe")
    p.add_argument("--per-category", type=int, default=None, help="captions per category (default 100)")
    p.add_argument("--model", default=None, help="model id or local directory (causal or seq2seq)")
    p.add_argument("--endpoint", default=None, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-key-env", default=None, help="environment variable holding the endpoint's key "
                   "(default OPENAI_API_KEY; the key is never printed)")
    p.add_argument("--out", default="captions.json")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--max-rounds", type=int, default=None, help="bound on generation rounds per category")
    p.add_argument("--instruction", default=None, help="instruction template ({category}, {focus})")


def settings_from_args(args: argparse.Namespace) -> LLMCaptionSettings:
    """The ``synthesis.captions`` settings the options give (one ConfigError line per bad option)."""
    if not (args.model or args.endpoint):
        raise ConfigError("captions generate: give --model ID_OR_DIR or --endpoint URL")
    fields = {k: getattr(args, k) for k in _FIELDS if getattr(args, k) is not None}
    try:
        return LLMCaptionSettings(**fields)
    except ValidationError as exc:
        raise ConfigError("\n".join(f"captions generate: --{str(e['loc'][0]).replace('_', '-')} "
                                     f"{e.get('input')!r}: {e['msg']}" for e in exc.errors())) from None


def run(args: argparse.Namespace, progress: Callable[[str], None] | None = None) -> int:
    from persrep.captions.generate import generate_captions, write_captions_file

    cats = [c.strip() for c in args.categories.split(",") if c.strip()]
    if not cats:
        raise ConfigError("--categories: give at least one category, e.g. --categories mug,shoe")
    cfg = settings_from_args(args)
    t0 = time.perf_counter()
    caps = generate_captions(cats, cfg, progress=progress)
    out = write_captions_file(caps, args.out)
    print(f"{sum(map(len, caps.values()))} captions for {len(caps)} categories written to {out} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0
