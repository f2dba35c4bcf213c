"""Grad-CAM (Selvaraju et al., ICCV 2017): channel weights are the spatial mean of the gradients."""

from __future__ import annotations

from torch import Tensor

from tame_lit.explainers.base import EXPLAINERS, GradientCAM

__all__ = ["GradCAM"]


@EXPLAINERS.register("gradcam")
class GradCAM(GradientCAM):
    """w_k = mean_ij dy^c/dA^k_ij;  L = ReLU(sum_k w_k A^k)."""

    def channel_weights(self, activations: Tensor, gradients: Tensor) -> Tensor:
        return gradients.mean(dim=(2, 3))
