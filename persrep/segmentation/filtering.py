"""Filtering the paper's way: segment each generated image, then score mask-box crops.

:class:`SegmentingScorer` wraps any :class:`~persrep.generation.filtering.SimilarityScorer`: it
segments every generated image with ``synthesis.filter.segmenter`` (PerSAM in the reference, with
the instance's train images and masks as its reference), stores the predicted mask on the sample
(so the shard row records it beside its ``filter_score``), and scores the mask-box crop of the
image against the references (each cropped to its own mask box by the scorer).
"""

from __future__ import annotations

from typing import Any

from persrep.generation.base import InstanceData, SampledImage
from persrep.segmentation.base import Reference, Segmenter, get_segmenter


class SegmentingScorer:
    def __init__(self, scorer: Any, segmenter: Segmenter, reference: Reference | None):
        self.scorer, self.segmenter, self.reference = scorer, segmenter, reference
        if segmenter.needs.reference and reference is None:
            raise ValueError(f"filter segmenter {segmenter.name} needs the instance's train masks as its "
                             "reference: give train_masks/ (persrep data masks) or generator.auto_masks=true")

    @classmethod
    def from_settings(cls, scorer: Any, settings: Any, instance: InstanceData) -> "SegmentingScorer":
        seg = get_segmenter(settings.synthesis.filter.segmenter, settings.segmentation)
        ref = Reference(instance.train_images, instance.train_masks) if instance.train_masks else None
        return cls(scorer, seg, ref)

    def __call__(self, samples: list[SampledImage]) -> list[float]:
        if not samples:
            return []
        predicted = self.segmenter.segment([s.image for s in samples], self.reference)
        for s, p in zip(samples, predicted):
            # an empty prediction keeps the whole image (mask_box_crop's rule) but is recorded as such
            s.mask = p.image()
        return self.scorer.score([s.image for s in samples], [s.mask for s in samples])
