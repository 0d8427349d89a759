"""Errors raised while building backbones and loading adapters.

Each one carries a single-line message that says what was asked for, what went wrong and how to
fix it, so a command-line user sees one line instead of a stack trace.
"""

from __future__ import annotations


class ModelError(RuntimeError):
    """Base class: a backbone or adapter could not be built or loaded as asked."""


class UnknownBackboneError(ModelError, ValueError):
    """The backbone name is not a timm model, or does not fit the requested weights source."""


class WeightsUnavailableError(ModelError):
    """Pretrained weights could not be found locally and may not be downloaded."""


class AdapterMismatchError(ModelError):
    """An adapter file was made for a different base backbone (name or weights)."""


class AdapterFormatError(ModelError):
    """A file is not a persrep LoRA adapter, or its tensors do not fit the backbone."""
