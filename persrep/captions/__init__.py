"""LLM-written captions (reference format: ``{category: ["A <new1> mug on a desk", ...]}``).

``validate`` (rules every caption passes), ``backends`` (a transformers model or an
OpenAI-compatible endpoint), ``generate`` (batched, seeded, deduplicated, bounded attempts).
"""
