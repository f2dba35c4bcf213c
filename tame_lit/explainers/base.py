"""The one call every explainer answers: ``explainer(images, targets=None) -> maps``."""

from __future__ import annotations

import torch
from torch import Tensor

from tame_lit.backbones import Backbone
from tame_lit.features import preserved_state

__all__ = ["Explainer"]


class Explainer:
    """Base of trained heads and classic CAM methods alike.

    ``images``: float ``[B, 3, H, W]`` in [0, 1] on any device; ``targets``: ``LongTensor[B]`` of class
    indices, or ``None`` for each image's top-1 class. Returns float32 ``[B, H, W]`` maps in [0, 1] on the
    images' device. Subclasses implement ``explain(images, targets, logits)``; this class checks inputs,
    runs it with the backbone's state (modes, ``requires_grad``) preserved, and checks the result.
    """

    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone

    @property
    def num_classes(self) -> int:
        return self.backbone.num_classes

    def __call__(self, images: Tensor, targets: Tensor | None = None) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"images must be float [B, 3, H, W] in [0, 1], got {images.dtype} {tuple(images.shape)}")
        if targets is not None:
            targets = self.check_targets(targets, images.shape[0]).to(images.device)
        with preserved_state(self.backbone):
            maps = self.explain(images, targets)
        if maps.shape != (images.shape[0], *images.shape[-2:]):
            raise RuntimeError(f"{type(self).__name__} returned {tuple(maps.shape)} for images {tuple(images.shape)}")
        return maps.float()

    def check_targets(self, targets: Tensor | int | list, batch: int) -> Tensor:
        targets = torch.as_tensor(targets)
        if targets.dim() != 1 or targets.shape[0] != batch or targets.is_floating_point():
            raise ValueError(
                f"targets must be a LongTensor of {batch} class indices (one per image), got "
                f"{targets.dtype} {tuple(targets.shape)}"
            )
        bad = targets[(targets < 0) | (targets >= self.num_classes)]
        if bad.numel():
            raise ValueError(f"targets must be in [0, {self.num_classes}), got {bad.tolist()}")
        return targets.long()

    def explain(self, images: Tensor, targets: Tensor | None) -> Tensor:
        raise NotImplementedError
