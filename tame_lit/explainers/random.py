"""A random explainer: the floor every real method must beat (a sanity baseline, as grad-cam's RandomCAM)."""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from tame_lit.backbones import Backbone
from tame_lit.explainers.base import EXPLAINERS, BackboneExplainer, to_maps

__all__ = ["RandomMaps"]


@EXPLAINERS.register("random")
class RandomMaps(BackboneExplainer):
    """Smooth random maps: uniform noise on a ``cells`` x ``cells`` grid, upsampled bilinearly.

    Each image's map depends only on ``seed`` and the image's own pixels (a digest of them seeds its
    generator), so a map does not change with the batch it is computed in. Ignores the target.
    """

    def __init__(self, backbone: Backbone, cells: int = 7, seed: int = 0) -> None:
        super().__init__(backbone)
        self.cells = int(cells)
        self.seed = int(seed)

    def explain(self, images: Tensor, targets: Tensor | None) -> Tensor:
        grids = []
        for image in images:
            digest = hashlib.sha256(image.detach().float().cpu().numpy().tobytes()).digest()
            generator = torch.Generator().manual_seed(self.seed ^ int.from_bytes(digest[:7], "little"))
            grids.append(torch.rand(self.cells, self.cells, generator=generator))
        return to_maps(torch.stack(grids).to(images.device), images.shape[-2:])
