"""The one registry pattern of tame-lit: backbones, heads, explainers and metrics are each found by name in a
``Registry``, a dict that lives beside their base class and that each implementation joins with
``@REGISTRY.register("name")`` (or ``REGISTRY.add(name, entry)``). The package's ``__init__`` imports every
implementation file, so importing the package fills its registry; an implementation that needs its
siblings (an explainer built over another one) reads the registry without importing the package."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(dict[str, T]):
    """``{name: entry}`` for one kind of component (``kind``: "head", "explainer", ... for messages)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` under ``name``; a name is taken once."""
        if name in self:
            raise ValueError(f"{self.kind} {name!r} is already registered ({self[name]!r})")
        self[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator: ``@HEADS.register("tame")``."""

        def decorate(entry: T) -> T:
            return self.add(name, entry)

        return decorate

    def lookup(self, name: str) -> T:
        """The entry named ``name``, or a ``ValueError`` that lists the registered names."""
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; available: {self.available()}")
        return self[name]

    def available(self) -> list[str]:
        return sorted(self)
