"""Trainable explanation heads: one file per head, registered here by name.

A new head is a subclass of ``ExplanationHead`` in its own file, one line in ``HEADS`` and a config in
``conf/head/``; the training module needs no change.
"""

from __future__ import annotations

from collections.abc import Sequence

from tame_lit.backbones import Backbone
from tame_lit.heads.base import ExplanationHead, select_classes
from tame_lit.heads.tame import TameHead

__all__ = ["HEADS", "ExplanationHead", "TameHead", "available", "create", "select_classes"]

HEADS: dict[str, type[ExplanationHead]] = {
    "tame": TameHead,
}


def available() -> list[str]:
    return sorted(HEADS)


def create(name: str, backbone: Backbone, layers: Sequence[str] | None = None, **options: object) -> ExplanationHead:
    """Build head ``name`` for ``backbone``, reading ``layers`` (default: the backbone's default layers)."""
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; available: {available()}")
    layers = tuple(layers) if layers else backbone.default_layers
    return HEADS[name](backbone.layer_shapes(layers), backbone.num_classes, **options)
