"""Grad-CAM++ (Chattopadhay et al., WACV 2018), closed form for an exponential score."""

from __future__ import annotations

import torch
from torch import Tensor

from tame_lit.explainers.base import EXPLAINERS, GradientCAM

__all__ = ["GradCAMPlusPlus"]


@EXPLAINERS.register("gradcampp")
class GradCAMPlusPlus(GradientCAM):
    """a^k_ij = g^2 / (2 g^2 + sum_ab A^k_ab g^3) (0 where g = 0); w_k = sum_ij a^k_ij ReLU(g^k_ij)."""

    def channel_weights(self, activations: Tensor, gradients: Tensor) -> Tensor:
        squared = gradients.pow(2)
        denominator = 2 * squared + activations.sum(dim=(2, 3), keepdim=True) * gradients.pow(3)
        alpha = torch.where((gradients != 0) & (denominator != 0), squared / denominator, torch.zeros_like(gradients))
        return (alpha * torch.relu(gradients)).sum(dim=(2, 3))
