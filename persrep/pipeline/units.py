"""The base of every unit of work: a frozen dataclass with a ``key`` (its identity in storage),
and the error of a unit whose output may not be used."""

from __future__ import annotations

from typing import Any


class Unit:
    """Base of the frozen unit dataclasses (one per stage, in ``persrep.pipeline.stages``)."""

    key: str


class UnitRejected(RuntimeError):
    """A unit ran, but its output may not be used. Not retried: the same inputs give the same rows.

    ``details`` is the failure record (counts, score distribution, every distinct error), kept in
    the run's summary."""

    retryable = False

    def __init__(self, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.details = dict(details or {})
