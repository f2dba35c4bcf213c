"""TAME's masking objective: cross-entropy on the masked image plus area and smoothness of the masks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["MaskingLoss", "area_loss", "variation_loss"]


def area_loss(masks: Tensor, exponent: float = 0.3, offset: float = 0.0005) -> Tensor:
    """mean((A + offset) ** exponent) over every element; the offset keeps the gradient finite at 0."""
    return ((masks + offset) ** exponent).mean()


def variation_loss(masks: Tensor, border: float = 0.3) -> Tensor:
    """[sum of squared neighbour differences + border * squared border values] / (2 * batch size).

    ``masks`` is ``[B, M, h, w]``; sums run over all M maps of every image, and the border term counts
    the four edges (corners twice), as the original code does.
    """
    dy = (masks[..., 1:, :] - masks[..., :-1, :]).pow(2).sum()
    dx = (masks[..., :, 1:] - masks[..., :, :-1]).pow(2).sum()
    edges = (
        masks[..., 0, :].pow(2).sum()
        + masks[..., -1, :].pow(2).sum()
        + masks[..., :, 0].pow(2).sum()
        + masks[..., :, -1].pow(2).sum()
    )
    return (dx + dy + border * edges) / (2 * masks.shape[0])


@dataclass
class MaskingLoss:
    """L = ce * CE(logits of masked image, labels) + area * Area(A) + variation * Var(A).

    ``selection`` picks the maps A the regularisers see: ``"batch"`` gives every image's maps of all the
    labels in the batch (B x B, as the original TAME code and T-TAME's ``masking="random"``),
    ``"diagonal"`` each image's map of its own label (B x 1).
    """

    ce: float = 1.5
    area: float = 2.0
    variation: float = 0.01
    area_exponent: float = 0.3
    border: float = 0.3
    selection: str = "batch"

    def __post_init__(self) -> None:
        if self.selection not in ("batch", "diagonal"):
            raise ValueError(f"loss.selection must be 'batch' or 'diagonal', got {self.selection!r}")

    def regularised_maps(self, masks: Tensor, label_columns: Tensor) -> Tensor:
        """``masks`` [B, K, h, w] (sigmoid maps of K classes); ``label_columns`` [B] each label's column."""
        if self.selection == "batch":
            return masks[:, label_columns]
        return masks[torch.arange(masks.shape[0], device=masks.device), label_columns].unsqueeze(1)

    def __call__(
        self, masked_logits: Tensor, labels: Tensor, masks: Tensor, label_columns: Tensor
    ) -> dict[str, Tensor]:
        regularised = self.regularised_maps(masks, label_columns)
        terms = {
            "ce": self.ce * F.cross_entropy(masked_logits.float(), labels),
            "area": self.area * area_loss(regularised, self.area_exponent),
            "variation": self.variation * variation_loss(regularised, self.border),
        }
        terms["loss"] = terms["ce"] + terms["area"] + terms["variation"]
        return terms
