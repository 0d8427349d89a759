"""The base of every unit of work: a frozen dataclass with a ``key`` (its identity in storage).

``unit["key"]`` / ``unit.get("key")`` read a field, for callers written against the former dict
units (sweeps, tests, other engineers' code); new code reads attributes.
"""

from __future__ import annotations

from typing import Any


class Unit:
    """Base of the frozen unit dataclasses: ``unit["field"]`` / ``unit.get("field")`` read a field."""

    key: str

    def __getitem__(self, name: str) -> Any:
        try:
            return getattr(self, name)
        except AttributeError:
            raise KeyError(name) from None

    def get(self, name: str, default: Any = None) -> Any:
        return getattr(self, name, default)
