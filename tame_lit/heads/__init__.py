"""Trainable explanation heads: one file per head, each registered by name in ``HEADS``.

A new head is a subclass of ``ExplanationHead`` in its own file, decorated with ``@HEADS.register("name")``,
one import line here and a config in ``conf/head/``; the training module, evaluation and export need no
change.
"""

from __future__ import annotations

from collections.abc import Sequence

from tame_lit.backbones import Backbone
from tame_lit.heads.base import HEADS, ExplanationHead, head_maps, select_classes
from tame_lit.heads.sacam import SACAMHead
from tame_lit.heads.tame import TameHead

__all__ = ["HEADS", "ExplanationHead", "SACAMHead", "TameHead", "available", "create", "head_maps", "select_classes"]

available = HEADS.available


def create(name: str, backbone: Backbone, layers: Sequence[str] | None = None, **options: object) -> ExplanationHead:
    """Build head ``name`` for ``backbone``, reading ``layers`` (default: the head's choice, usually the
    backbone's default layers)."""
    return HEADS.lookup(name).from_backbone(backbone, layers, **options)
