"""User errors: problems the person running a command can fix (bottom layer, imports nothing).

Each one carries a single-line message that names what was asked for, what went wrong and the
fix. The command line (``persrep ...``, ``ray_jobs/*.py``) catches :class:`UserError`, prints that
line and exits 2, without a traceback. The types are defined here, below every layer that raises
or catches them, and re-exported where they were always imported from (``persrep.config``,
``persrep.storage``, ``persrep.data.layout``, ...).
"""

from __future__ import annotations


class UserError(Exception):
    """Base class of every error the command line prints as one line (exit code 2)."""


class ConfigError(UserError, ValueError):
    """A settings problem found before any compute. ``str()`` is one line per problem."""


class DatasetError(UserError, ValueError):
    """The data set cannot be used: the message names the path, the problem and the fix."""


class StorageError(UserError, RuntimeError):
    """A storage problem: the message names the location and the fix."""


class ModelError(UserError, RuntimeError):
    """Base class: a backbone or adapter could not be built or loaded as asked."""


class UnknownBackboneError(ModelError, ValueError):
    """The backbone name is not a timm model, or does not fit the requested weights source."""


class WeightsUnavailableError(ModelError):
    """Pretrained weights could not be found locally and may not be downloaded."""


class AdapterMismatchError(ModelError):
    """An adapter file was made for a different base backbone (name or weights)."""


class AdapterFormatError(ModelError):
    """A file is not a persrep LoRA adapter, or its tensors do not fit the backbone."""


class ModelUnavailableError(UserError, RuntimeError):
    """A base model that cannot be loaded here; ``str()`` is one line naming the fix."""


class CaptionError(UserError, ValueError):
    """Captions cannot be produced: one line naming the model/endpoint, the problem and the fix."""


class TrackingError(UserError, RuntimeError):
    """Tracking was required (``tracking.required=true``) but is not available."""


class InsufficientResourcesError(UserError, ValueError):
    """A unit needs more memory than any node has: said before any compute, with the fix."""


class SegmenterUnavailableError(UserError, RuntimeError):
    """A segmenter's weights or package are missing; the one-line message says what to provide."""
