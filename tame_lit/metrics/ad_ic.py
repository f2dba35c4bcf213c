"""Average Drop and Increase in Confidence, TAME's definition (spec tame.md §3)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from tame_lit.maps import keep_top
from tame_lit.metrics.base import METRICS, Column, FaithfulnessMetric, ScoredBatch, class_probability

__all__ = ["AverageDropIncrease", "masked_probability", "percent"]


def percent(fraction: float) -> str:
    """0.15 -> "15" (metric keys say percent of pixels)."""
    value = 100 * fraction
    return str(round(value)) if math.isclose(value, round(value)) else f"{value:g}"


def masked_probability(
    model: Callable[[Tensor], Tensor], images: Tensor, maps: Tensor, targets: Tensor, fraction: float
) -> Tensor:
    """O of TAME's AD/IC: the target's probability on the [0, 1] image multiplied by its map, after keeping
    the top ``fraction`` of each map's pixels (soft values; the rest zero, i.e. black)."""
    kept = keep_top(maps, fraction).unsqueeze(1).to(images.dtype)
    return class_probability(model(images * kept), targets)


@METRICS.register("ad_ic")
class AverageDropIncrease(FaithfulnessMetric):
    """AD = mean max(0, Y - O) / Y * 100 and IC = mean 1[O > Y] * 100, at each fraction of pixels ``keep``.

    Y is the softmax probability of the explained class on the clean image and O on the image masked by
    the explanation (``masked_probability``). Keys ``AD@<p>`` and ``IC@<p>`` with p in percent; TAME reports
    100 / 50 / 15 %, and 20 % is An & Joe's "first 20 %" reading. ``ranked``: the fractions whose AD and IC
    count in the mean rank. States are sums and a count, so results are exact when summed across processes.
    """

    def __init__(
        self,
        keep: Sequence[float] = (1.0, 0.5, 0.15, 0.2),
        ranked: Sequence[float] = (0.15,),
        **kwargs: Any,
    ) -> None:
        fractions = tuple(float(f) for f in keep)
        if not fractions or any(not 0.0 < f <= 1.0 for f in fractions):
            raise ValueError(f"keep must list fractions of pixels in (0, 1], got {list(keep)}")
        if len({percent(f) for f in fractions}) != len(fractions):
            raise ValueError(f"keep lists a fraction twice: {list(keep)}")
        self.keep = fractions
        self.ranked = tuple(float(f) for f in ranked)
        super().__init__(per_image_keys=[f"{kind}@{percent(f)}" for f in fractions for kind in ("AD", "IC")], **kwargs)
        zeros = torch.zeros(len(fractions), dtype=torch.float64)
        self.add_state("drop", default=zeros.clone(), dist_reduce_fx="sum")
        self.add_state("increase", default=zeros.clone(), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, batch: ScoredBatch) -> None:
        with torch.no_grad():
            masked = torch.stack(
                [masked_probability(batch.model, batch.images, batch.maps, batch.targets, f) for f in self.keep]
            )
        clean, masked = batch.clean_probs.double(), masked.double().to(batch.clean_probs.device)
        drops = 100 * (clean - masked).clamp_min(0) / clean.clamp_min(1e-12)
        increases = 100 * (masked > clean).double()
        # out of place: states reset under inference mode (trainer.validate) stay usable afterwards
        self.drop = self.drop + drops.sum(dim=1).to(self.drop.device)
        self.increase = self.increase + increases.sum(dim=1).to(self.increase.device)
        self.count = self.count + clean.numel()
        values = {}
        for i, fraction in enumerate(self.keep):
            values[f"AD@{percent(fraction)}"] = drops[i]
            values[f"IC@{percent(fraction)}"] = increases[i]
        self.record(batch.indices, **values)

    def compute(self) -> dict[str, float]:
        count = max(int(self.count), 1)
        result = {}
        for i, fraction in enumerate(self.keep):
            result[f"AD@{percent(fraction)}"] = float(self.drop[i]) / count
            result[f"IC@{percent(fraction)}"] = float(self.increase[i]) / count
        return result

    def columns(self) -> list[Column]:
        columns = []
        for fraction in self.keep:
            ranked = any(math.isclose(fraction, r) for r in self.ranked)
            p = percent(fraction)
            columns.append(Column(f"AD@{p}", f"AD@{p} ↓", False, 2, primary=ranked))
            columns.append(Column(f"IC@{p}", f"IC@{p} ↑", True, 1, primary=ranked, share=True, scale=100.0))
        return columns
