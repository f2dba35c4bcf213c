"""Post-hoc, parameter-free SA-CAM (after Liang, Li & Jiang, Neurocomputing 2022; spec methods.md §A, an
unverified reading of the abstract): a Grad-CAM-family map over feature maps refined by spatial self-attention."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from tame_lit.backbones import Backbone
from tame_lit.explainers.attention_gradcam import float32_attention
from tame_lit.explainers.base import EXPLAINERS, GradientCAM

__all__ = ["PostHocSACAM", "channel_weight_bases"]


def _uses_channel_weights(cls: object) -> bool:
    """A Grad-CAM-family class whose map is ReLU(sum_k w_k A^k) with its own channel weights w_k."""
    return (
        isinstance(cls, type)
        and issubclass(cls, GradientCAM)
        and cls.layer_map is GradientCAM.layer_map
        and cls.channel_weights is not GradientCAM.channel_weights
    )


def channel_weight_bases() -> list[str]:
    """Registered explainers SA-CAM can wrap (gradcam, gradcampp, xgradcam, and any later such method)."""
    return [name for name in EXPLAINERS.available() if _uses_channel_weights(EXPLAINERS[name])]


@EXPLAINERS.register("sacam_posthoc")
class PostHocSACAM(GradientCAM):
    """L = ReLU(sum_k w_k A'^k) with A' = A + gamma * A_att, w_k the ``base`` method's channel weights
    computed on the original A and gradients (so ``gamma=0`` gives the base's map back exactly).

    Attention branch, no learned projections: F = A as K x N (N = h*w positions);
    S = softmax_row(F~^T F~ / temperature), F~ = F with each position's K-vector L2-normalised when
    ``cosine`` (cosine affinity), else F~ = F; A_att = F S^T (every position an affinity-weighted mix of all
    positions). ``temperature=None`` means 0.1 with ``cosine`` and sqrt(K) without it (the spec's defaults;
    None because the default depends on K).
    """

    def __init__(
        self,
        backbone: Backbone,
        layers=None,
        base: str = "gradcam",
        gamma: float = 1.0,
        temperature: float | None = None,
        cosine: bool = True,
    ) -> None:
        super().__init__(backbone, layers)
        cls = EXPLAINERS.get(base)
        if not _uses_channel_weights(cls):
            raise ValueError(
                f"SA-CAM's base must be a Grad-CAM-family method with channel weights, one of "
                f"{channel_weight_bases()}; got {base!r}"
            )
        if not gamma >= 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        if temperature is not None and not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.base = cls(backbone, self.layers)
        self.base_name = base
        self.gamma = float(gamma)
        self.temperature = None if temperature is None else float(temperature)
        self.cosine = bool(cosine)

    def channel_weights(self, activations: Tensor, gradients: Tensor) -> Tensor:
        return self.base.channel_weights(activations, gradients)

    def layer_map(self, activations: Tensor, gradients: Tensor) -> Tensor:
        weights = self.channel_weights(activations, gradients)
        refined = activations + self.gamma * self.attend(activations)
        return torch.relu((weights[:, :, None, None] * refined).sum(dim=1))

    def attend(self, activations: Tensor) -> Tensor:
        """A_att = F S^T as ``[B, K, h, w]``, computed as attention over the N position tokens."""
        tokens = activations.flatten(2).transpose(1, 2)  # [B, N, K]: row i is F[:, i]
        keys = F.normalize(tokens, dim=2) if self.cosine else tokens
        temperature = self.temperature
        if temperature is None:
            temperature = 0.1 if self.cosine else math.sqrt(activations.shape[1])
        attended = float32_attention(keys, keys, tokens, scale=1.0 / temperature)  # [B, N, K] = (F S^T)^T
        return attended.transpose(1, 2).reshape(activations.shape)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(backbone={self.backbone.name!r}, layers={list(self.layers)}, "
            f"base={self.base_name!r}, gamma={self.gamma}, temperature={self.temperature}, cosine={self.cosine})"
        )
