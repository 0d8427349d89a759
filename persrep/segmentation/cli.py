"""The command-line side of the segmenters: ``persrep data masks`` and ``import --auto-masks``."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from persrep.config import load_settings


def _settings(config: str, overrides: list[str], segmenter: str | None, model: str | None):
    extra = list(overrides)
    if segmenter:
        extra.append(f"segmentation.segmenter={segmenter}")
    if model:
        extra.append(f"segmentation.model={model}")
    return load_settings(config, extra)


def _report(res, say: Callable[[str], None]) -> int:
    for split, n in res.written.items():
        print(f"{split}_masks: {n} predicted with {res.segmenter}, {res.kept.get(split, 0)} kept "
              f"in {res.path} ({res.seconds:.1f} s); labelled as predicted in the info file")
    for split in set(res.kept) - set(res.written):
        print(f"{split}_masks: every image already has a mask ({res.kept[split]}); nothing to do "
              "(--overwrite replaces them)")
    low = res.low
    if low:
        print(f"WARNING {len(low)} masks have confidence < {res.threshold}: check them "
              f"(`persrep data check {res.path}` lists them), e.g. {low[0]}")
    return 1 if low else 0


def cmd_data_masks(args: argparse.Namespace, say: Callable[[str], None]) -> int:
    """Exit 0 written, 1 written with low-confidence masks, 2 bad input."""
    from persrep.segmentation.dataset import write_masks

    settings = _settings(args.config, args.overrides, args.segmenter, args.model)
    splits = ("train", "test") if args.test else ("train",)
    res = write_masks(args.src, settings.segmentation, splits=splits, overwrite=args.overwrite,
                      s3_endpoint=settings.storage.s3_endpoint, progress=say)
    return _report(res, say)


def auto_masks_after_import(args: argparse.Namespace, dest: str, say: Callable[[str], None]) -> int:
    from persrep.segmentation.dataset import write_masks

    settings = _settings("local", [], args.segmenter, args.model)
    res = write_masks(str(dest), settings.segmentation, progress=say if args.verbose else None)
    return _report(res, say)
