"""XGrad-CAM (Fu et al., BMVC 2020): gradients weighted by the normalised activations."""

from __future__ import annotations

import torch
from torch import Tensor

from tame_lit.explainers.base import EXPLAINERS, GradientCAM

__all__ = ["XGradCAM"]


@EXPLAINERS.register("xgradcam")
class XGradCAM(GradientCAM):
    """w_k = sum_ij (A^k_ij / sum_ab A^k_ab) dy^c/dA^k_ij (a channel that sums to 0 gets weight 0)."""

    def channel_weights(self, activations: Tensor, gradients: Tensor) -> Tensor:
        total = activations.sum(dim=(2, 3), keepdim=True)
        share = torch.where(total != 0, activations / torch.where(total != 0, total, 1.0), 0.0)
        return (share * gradients).sum(dim=(2, 3))
