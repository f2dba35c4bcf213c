"""Layer-CAM (Jiang et al., IEEE TIP 2021): per-pixel weights, one or several layers."""

from __future__ import annotations

import torch
from torch import Tensor

from tame_lit.backbones import Backbone
from tame_lit.explainers.base import EXPLAINERS, GradientCAM
from tame_lit.maps import normalize

__all__ = ["LayerCAM"]


@EXPLAINERS.register("layercam")
class LayerCAM(GradientCAM):
    """L = ReLU(sum_k ReLU(dy^c/dA^k) * A^k).

    With several layers (spec methods.md §E, as torchcam): each layer's map is min-max normalised,
    scaled by tanh(gamma * map) (gamma = 2), upsampled, and the layers are fused by element-wise max.
    """

    def __init__(self, backbone: Backbone, layers=None, gamma: float = 2.0) -> None:
        super().__init__(backbone, layers)
        self.gamma = float(gamma)

    def layer_map(self, activations: Tensor, gradients: Tensor) -> Tensor:
        return torch.relu((torch.relu(gradients) * activations).sum(dim=1))

    def fuse(self, maps: list[Tensor]) -> Tensor:
        if len(maps) == 1:
            return maps[0]
        return normalize(torch.stack([torch.tanh(self.gamma * m) for m in maps]).amax(dim=0))
