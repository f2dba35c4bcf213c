"""A trained head as an explainer: min-max of its pre-sigmoid map of the class, upsampled (tame.md §1.4).

Loading one from a file (checkpoint, export folder, program, ONNX graph) is ``tame_lit.load_explainer``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tame_lit.backbones import Backbone
from tame_lit.explainers.base import BackboneExplainer
from tame_lit.features import preserved_state
from tame_lit.heads import ExplanationHead, head_maps

__all__ = ["HeadExplainer", "head_maps"]


class HeadExplainer(BackboneExplainer):
    """Explanations of a trained head; one backbone pass per batch, no gradients."""

    def __init__(self, backbone: Backbone, head: ExplanationHead) -> None:
        super().__init__(backbone)
        self.head = head

    def networks(self) -> list[nn.Module]:
        return [self.backbone, self.head]

    def to(self, device: str | torch.device) -> HeadExplainer:
        self.backbone.to(device)
        self.head.to(device)
        return self

    @torch.no_grad()
    def explain(self, images: Tensor, targets: Tensor | None) -> Tensor:
        with preserved_state(self.head):  # the backbone's state is restored by BackboneExplainer.compute_maps
            self.head.eval()
            logits, features = self.backbone.features(images, self.head.layers)
            if targets is None:
                targets = logits.argmax(dim=1)
            return head_maps(self.head, features, targets, images.shape[-2:])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backbone={self.backbone.name!r}, head={type(self.head).__name__})"
