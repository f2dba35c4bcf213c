"""Trainable explanation heads: one file per head, registered here by name.

A new head is a subclass of ``ExplanationHead`` in its own file, one line in ``HEADS`` and a config in
``conf/head/``; the training module, evaluation and export need no change.
"""

from __future__ import annotations

from collections.abc import Sequence

from tame_lit.backbones import Backbone
from tame_lit.heads.base import ExplanationHead, select_classes
from tame_lit.heads.sacam import SACAMHead
from tame_lit.heads.tame import TameHead

__all__ = ["HEADS", "ExplanationHead", "SACAMHead", "TameHead", "available", "create", "select_classes"]

HEADS: dict[str, type[ExplanationHead]] = {
    "tame": TameHead,
    "sacam": SACAMHead,
}


def available() -> list[str]:
    return sorted(HEADS)


def create(name: str, backbone: Backbone, layers: Sequence[str] | None = None, **options: object) -> ExplanationHead:
    """Build head ``name`` for ``backbone``, reading ``layers`` (default: the head's choice, usually the
    backbone's default layers)."""
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; available: {available()}")
    return HEADS[name].from_backbone(backbone, layers, **options)
