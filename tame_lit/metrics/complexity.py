"""Complexity (Bhatt et al., IJCAI 2020): the entropy of a map's values as a distribution over its pixels."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tame_lit.metrics.base import METRICS, ImageMean, ScoredBatch

__all__ = ["Complexity", "map_entropy"]


def map_entropy(maps: Tensor) -> Tensor:
    """``[B]`` entropy (nats) of each map ``[B, H, W]`` (non-negative) read as the distribution
    p = a / sum(a) over its n pixels: -sum p log p, from 0 (one pixel) to log n (a constant map). A blank map
    has no distribution; it gets log n, as uninformative as a constant one."""
    values = maps.flatten(1).double().clamp_min(0)
    total = values.sum(dim=1, keepdim=True)
    shares = values / total.clamp_min(torch.finfo(torch.float64).tiny)
    entropy = -torch.where(shares > 0, shares * shares.log(), torch.zeros_like(shares)).sum(dim=1)
    return torch.where(total[:, 0] > 0, entropy, torch.full_like(entropy, math.log(values.shape[1])))


@METRICS.register("complexity")
class Complexity(ImageMean):
    """Mean entropy of the maps (lower: a simpler, more concentrated explanation). A property of the maps alone
    (no model pass); Quantus's ``Complexity`` computes the same, with 1e-12 inside the logarithm."""

    higher_is_better = False
    key = "complexity"
    title = "Complexity ↓"

    def update(self, batch: ScoredBatch) -> None:
        self.add(batch.indices, map_entropy(batch.maps))
