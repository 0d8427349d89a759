"""Segmenters: object masks without annotation (GrabCut, SAM, PerSAM); see ``base.py``."""

from persrep.segmentation.base import (Needs, Reference, Segmentation, Segmenter,
                                       SegmenterUnavailableError, get_segmenter, make_segmenter,
                                       register_segmenter, require_available, segmenter_class,
                                       segmenter_names)

__all__ = ["Needs", "Reference", "Segmentation", "Segmenter", "SegmenterUnavailableError",
           "get_segmenter", "make_segmenter", "register_segmenter", "require_available",
           "segmenter_class", "segmenter_names"]
