"""Sparseness (Chalasani et al., ICML 2020): the Gini index of a map's values, how concentrated it is."""

from __future__ import annotations

import torch
from torch import Tensor

from tame_lit.metrics.base import METRICS, ImageMean, ScoredBatch

__all__ = ["Sparseness", "gini_index"]


def gini_index(maps: Tensor) -> Tensor:
    """``[B]`` Gini index of each map's values ``[B, H, W]`` (non-negative): with the n values sorted
    ascending, G = sum_i (2i - n - 1) a_(i) / (n sum_i a_i), i = 1..n; 0 for a constant map (a blank one too),
    (n - 1) / n for a map with one non-zero pixel. Float64 sums: a 224 x 224 map has 50,176 values."""
    values = maps.flatten(1).double().clamp_min(0).sort(dim=1).values
    count = values.shape[1]
    ranks = torch.arange(1, count + 1, device=values.device, dtype=torch.float64)
    total = values.sum(dim=1)
    gini = ((2 * ranks - count - 1) * values).sum(dim=1) / (count * total)
    return torch.where(total > 0, gini, torch.zeros_like(gini))


@METRICS.register("sparseness")
class Sparseness(ImageMean):
    """Mean Gini index of the maps (higher: fewer pixels carry the map's mass). A property of the maps alone (no
    model pass); Quantus's ``Sparseness`` computes it on the maps plus 1e-7 (the README's metric table)."""

    higher_is_better = True
    key = "sparseness"
    title = "Sparseness ↑"

    def update(self, batch: ScoredBatch) -> None:
        self.add(batch.indices, gini_index(batch.maps))
