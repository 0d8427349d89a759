"""Errors raised while building backbones and loading adapters: defined in :mod:`persrep.errors`
(the bottom layer the command line catches them from), importable from here as before."""

from __future__ import annotations

from persrep.errors import (AdapterFormatError, AdapterMismatchError, ModelError,  # noqa: F401
                            UnknownBackboneError, WeightsUnavailableError)

__all__ = ["AdapterFormatError", "AdapterMismatchError", "ModelError", "UnknownBackboneError",
           "WeightsUnavailableError"]
