"""A trained head as an explainer: min-max of its pre-sigmoid map of the class, upsampled (tame.md §1.4)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from tame_lit.backbones import Backbone
from tame_lit.explainers.base import Explainer
from tame_lit.features import preserved_state
from tame_lit.heads import ExplanationHead, select_classes
from tame_lit.maps import normalize, upsample

__all__ = ["HeadExplainer", "head_maps", "load_explainer"]


def head_maps(head: ExplanationHead, features: dict[str, Tensor], targets: Tensor, size: tuple[int, int]) -> Tensor:
    """Each image's explanation for its target: min-max at the head's resolution, then bilinear upsampling."""
    classes = torch.unique(targets)
    logits = head(features, classes)
    return upsample(normalize(select_classes(logits, classes, targets)), size)


class HeadExplainer(Explainer):
    """Explanations of a trained head; one backbone pass per batch, no gradients."""

    def __init__(self, backbone: Backbone, head: ExplanationHead) -> None:
        super().__init__(backbone)
        self.head = head

    @torch.no_grad()
    def explain(self, images: Tensor, targets: Tensor | None) -> Tensor:
        with preserved_state(self.head):  # the backbone's state is restored by Explainer.__call__
            self.head.eval()
            logits, features = self.backbone.features(images, self.head.layers)
            if targets is None:
                targets = logits.argmax(dim=1)
            return head_maps(self.head, features, targets, images.shape[-2:])


def load_explainer(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> HeadExplainer:
    """A trained head as an ``Explainer``, from a tame-lit Lightning checkpoint (head-only; the backbone is
    rebuilt from the checkpoint's config). Read with ``weights_only=True``: nothing in the file runs."""
    from tame_lit.training import HeadTrainingModule

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"explainer checkpoint not found: {path.resolve()}")
    module = HeadTrainingModule.load_from_checkpoint(path, map_location=map_location, weights_only=True)
    return HeadExplainer(module.backbone.eval(), module.head.eval())
