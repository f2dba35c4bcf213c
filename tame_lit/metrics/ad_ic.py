"""Average Drop and Increase in Confidence, TAME's definition (spec tame.md §3)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torchmetrics import Metric

from tame_lit.maps import keep_top
from tame_lit.metrics.base import class_probability

__all__ = ["AverageDropIncrease", "masked_probability"]


def masked_probability(
    model: Callable[[Tensor], Tensor], images: Tensor, maps: Tensor, targets: Tensor, fraction: float
) -> Tensor:
    """O of TAME's AD/IC: the target's probability on the [0, 1] image multiplied by its map, after keeping
    the top ``fraction`` of each map's pixels (soft values; the rest zero, i.e. black)."""
    kept = keep_top(maps, fraction).unsqueeze(1).to(images.dtype)
    return class_probability(model(images * kept), targets)


class AverageDropIncrease(Metric):
    """AD = mean max(0, Y - O) / Y * 100 and IC = mean 1[O > Y] * 100.

    Y is the softmax probability of the explained class on the clean image and O on the image masked by
    the explanation. States are sums and a count, so results are exact when summed across processes.
    """

    full_state_update = False
    higher_is_better = None

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.add_state("drop", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("increase", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, clean_prob: Tensor, masked_prob: Tensor) -> None:
        if clean_prob.shape != masked_prob.shape or clean_prob.dim() != 1:
            raise ValueError(
                f"expected two [B] probability tensors, got {tuple(clean_prob.shape)} and {tuple(masked_prob.shape)}"
            )
        clean, masked = clean_prob.double(), masked_prob.double()
        # out of place: states reset under inference mode (trainer.validate) stay usable afterwards
        self.drop = self.drop + ((clean - masked).clamp_min(0) / clean.clamp_min(1e-12)).sum()
        self.increase = self.increase + (masked > clean).sum()
        self.count = self.count + clean.numel()

    def compute(self) -> dict[str, Tensor]:
        count = self.count.clamp_min(1).double()
        return {"AD": 100 * self.drop / count, "IC": 100 * self.increase / count, "count": self.count.double()}
