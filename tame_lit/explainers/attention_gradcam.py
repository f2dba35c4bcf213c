"""Attention-guided Grad-CAM (An & Joe, Appl. Sci. 2022; spec methods.md §B, formulation unverified):
parameter-free self-attention over the spatial tokens of the gradient-weighted feature maps."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

from tame_lit.backbones import Backbone
from tame_lit.explainers.base import EXPLAINERS, GradientCAM

__all__ = ["AttentionGradCAM", "float32_attention"]


def float32_attention(query: Tensor, key: Tensor, value: Tensor, scale: float | None = None) -> Tensor:
    """softmax(query key^T * scale) value over ``[..., N, K]`` tokens (scale 1/sqrt(K) by default), in
    float32 with autocast off: under autocast, scaled_dot_product_attention would run in half precision
    and the maps would not be the method's float32 maps. Batched and memory-efficient (fused kernels)."""
    try:
        no_autocast = torch.autocast(query.device.type, enabled=False)
    except RuntimeError:  # a device type without autocast
        no_autocast = contextlib.nullcontext()
    with no_autocast:
        return F.scaled_dot_product_attention(query.float(), key.float(), value.float(), scale=scale)


@EXPLAINERS.register("attention_gradcam")
class AttentionGradCAM(GradientCAM):
    """alpha_k = mean_ij dy^c/dA^k_ij; A_hat^k = alpha_k A^k; tokens X = A_hat as [N = h*w, K];
    Z = softmax(X~ X~^T / sqrt(K)) X; M = ReLU(sum_k Z_k) as h x w.

    Q = K = V = X (no learned projections, nothing to train). ``guided=True`` multiplies M by the plain
    Grad-CAM map ReLU(sum_k A_hat^k) (the paper's "attention map-guided" variant, as the spec reads it).

    ``scale_tokens`` (tame-lit's choice; the paper's method section is not available): the affinities use
    X~ = X / rms(X) per image. With X itself (``scale_tokens=False``, the spec's literal formula) the scores
    are as small as the gradients (about 1e-4 on EfficientNet-Lite0's ``bn2``): the attention is uniform,
    M is a constant plus float32 noise, and the map means nothing. Rescaling makes the attention
    independent of the logit's scale; the values attended to are still X.
    """

    def __init__(self, backbone: Backbone, layers=None, guided: bool = False, scale_tokens: bool = True) -> None:
        super().__init__(backbone, layers)
        self.guided = bool(guided)
        self.scale_tokens = bool(scale_tokens)

    def layer_map(self, activations: Tensor, gradients: Tensor) -> Tensor:
        batch, _, height, width = activations.shape
        weighted = gradients.mean(dim=(2, 3))[:, :, None, None] * activations
        tokens = weighted.flatten(2).transpose(1, 2)  # [B, N, K]
        keys = tokens
        if self.scale_tokens:
            rms = tokens.pow(2).mean(dim=(1, 2), keepdim=True).sqrt()
            keys = tokens / torch.where(rms > 0, rms, 1.0)
        # sum_k Z_k = Att (sum_k X_k): one value column instead of K. Att's rows sum to 1, so attending to the
        # centred sums and adding their mean back is the same in exact arithmetic, and keeps the differences
        # between positions further from float32 rounding when the attention is nearly uniform.
        sums = tokens.sum(dim=2, keepdim=True)  # [B, N, 1]
        mean = sums.mean(dim=1, keepdim=True)
        attended = mean + float32_attention(keys, keys, sums - mean)
        attention_map = torch.relu(attended.squeeze(2)).view(batch, height, width)
        if self.guided:
            attention_map = attention_map * torch.relu(sums.squeeze(2)).view(batch, height, width)
        return attention_map

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(backbone={self.backbone.name!r}, layers={list(self.layers)}, guided={self.guided}, "
            f"scale_tokens={self.scale_tokens})"
        )
