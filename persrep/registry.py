"""One small registry helper for every pluggable component: generators, segmenters, tasks.

A :class:`Registry` maps a name to a class (or any object). Built-in components are listed by
module path and imported on first lookup, so importing a registry is cheap and one component's
module failing to import does not break the others. A new component is one module plus one
``register`` call (usually a class decorator in the component's interface module); nothing else
names it. The registries themselves are declared here, at the bottom of the package, so
:mod:`persrep.config` can check a settings value against them without importing the components.

Bottom layer: imports nothing from persrep.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Names -> components of one kind (``kind`` and ``setting`` appear in error messages)."""

    def __init__(self, kind: str, setting: str, builtin: dict[str, str] | None = None):
        self.kind = kind
        self.setting = setting
        self.builtin = dict(builtin or {})  # name -> module that registers it when imported
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T) -> T:
        """Register ``item`` as ``name``. Re-registering the same class (a module re-imported,
        e.g. by a test reload) is fine; another one under a taken name is an error."""
        if not name or not isinstance(name, str):
            raise TypeError(f"a {self.kind} needs a non-empty string name, got {name!r}")
        existing = self._items.get(name)
        if existing is not None and _qualname(existing) != _qualname(item):
            raise ValueError(f"{self.kind} {name!r} is already registered by {_where(existing)}; "
                             "pick another name")
        self._items[name] = item
        return item

    def remove(self, name: str) -> None:
        """Forget a registered name (tests that register a component clean up with this)."""
        self._items.pop(name, None)

    def names(self) -> list[str]:
        return sorted(set(self._items) | set(self.builtin))

    def __contains__(self, name: object) -> bool:
        return name in self._items or name in self.builtin

    def get(self, name: str) -> T:
        """The component registered as ``name`` (its built-in module imported on first use)."""
        if name not in self._items and name in self.builtin:
            importlib.import_module(self.builtin[name])
        if name not in self._items:
            raise ValueError(self.unknown(name))
        return self._items[name]

    def unknown(self, name: Any, setting: str | None = None) -> str:
        return f"unknown {self.kind} {name!r}: choose one of {self.names()} ({setting or self.setting})"

    def check(self, names: Iterable[str], setting: str | None = None) -> None:
        """Raise ``ValueError`` (one line, the choices) for the first name not registered."""
        for name in names:
            if name not in self:
                raise ValueError(self.unknown(name, setting))


def _qualname(item: Any) -> str:
    return getattr(item, "__qualname__", None) or getattr(type(item), "__qualname__", repr(item))


def _where(item: Any) -> str:
    return f"{getattr(item, '__module__', '?')}.{_qualname(item)}"


# -- the registries (built-in components by module; others register themselves) ----------------
GENERATORS: Registry[Any] = Registry("generator type", "generator.types", {
    "real_only": "persrep.generation.real_only",
    "cut_paste": "persrep.generation.cut_paste",
    "dreambooth": "persrep.generation.dreambooth",
    "masked_dreambooth": "persrep.generation.dreambooth",
})
# a generator type's own settings section, ``generator.<section>`` (a pydantic class in a light
# module: persrep.config assembles the schema from these without importing the generators)
GENERATOR_SECTIONS: Registry[Any] = Registry("generator settings section", "generator.<section>", {
    "cut_paste": "persrep.generation.cut_paste_settings",
    "dreambooth": "persrep.generation.dreambooth_settings",
})
SEGMENTERS: Registry[Any] = Registry("segmenter", "segmentation.segmenter", {
    "grabcut": "persrep.segmentation.grabcut",
    "sam": "persrep.segmentation.sam",
    "persam": "persrep.segmentation.sam",
})
TASKS: Registry[Any] = Registry("evaluation task", "evaluation.tasks", {
    "classification": "persrep.evaluation.tasks",
    "retrieval": "persrep.evaluation.tasks",
    "detection": "persrep.evaluation.tasks",
    "segmentation": "persrep.evaluation.tasks",
})
