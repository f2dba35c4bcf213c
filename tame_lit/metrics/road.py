"""ROAD (Rong et al., ICML 2022): accuracy after removing the most (MoRF) or least (LeRF) relevant pixels
and filling them by noisy linear imputation (``imputation.py``), batched on any device."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from tame_lit.metrics.base import METRICS, Column, Curve, FaithfulnessMetric, ScoredBatch, hashed_seed, probabilities
from tame_lit.metrics.imputation import noisy_linear_impute

__all__ = ["ORDERS", "RoadScore", "noise_seed", "removal_ranks"]

ORDERS = ("morf", "lerf")
_TITLES = {"morf": "MoRF", "lerf": "LeRF"}


def noise_seed(seed: int, index: int, level: float, order: str) -> int:
    """The seed of one image's noise at one ROAD level (``hashed_seed`` of what identifies the draw)."""
    return hashed_seed(f"{seed}/{index}/{float(level)!r}/{order}")


def removal_ranks(maps: Tensor, order: str) -> Tensor:
    """Each pixel's place in the removal order, ``[B, H*W]`` (0 = removed first): a stable sort of each
    map, so ties go by pixel position and every level removes an exact count, whatever the batch."""
    flat = maps.flatten(1).float()
    ranked = torch.sort(flat, dim=1, descending=order == "morf", stable=True).indices
    positions = torch.arange(flat.shape[1], device=flat.device).expand_as(ranked)
    return torch.empty_like(ranked).scatter_(1, ranked, positions)


@METRICS.register("road")
class RoadScore(FaithfulnessMetric):
    """ROAD: remove a fraction of each image's pixels by the ranking of its map, impute them
    (``noisy_linear_impute``) and ask the model again, for each of ``levels`` and each of ``orders``.

    ``morf`` removes the most relevant pixels first (a faithful map makes accuracy fall fast: lower is
    better); ``lerf`` the least relevant (higher is better). Accuracy counts the imputed images whose top-1
    class is the clean image's top-1 class (T-TAME, ROAD paper); ``probability`` is the mean softmax
    probability of the targets. Images are in [0, 1] and imputed there (the model normalises internally), so
    the noise std is in [0, 1] units. Each image's noise is seeded from ``seed``, its dataset index, the level
    and the order: results are per image, independent of batch composition and process. States are
    per-level float64 sums and a count, so DDP sums are exact. Keys per order: ``road_<order>`` (accuracy
    averaged over the levels), ``road_<order>_probability``, and per level ``road_<order>@<percent>`` and
    ``road_<order>_probability@<percent>``.
    """

    def __init__(
        self,
        levels: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
        orders: Sequence[str] = ORDERS,
        noise: float = 0.01,
        seed: int = 0,
        chunk_size: int = 64,
        **kwargs: Any,
    ) -> None:
        levels = tuple(float(level) for level in levels)
        if not levels:
            raise ValueError("levels must not be empty")
        bad = [level for level in levels if not 0.0 < level < 1.0]
        if bad:
            raise ValueError(f"levels are fractions of pixels removed, each in (0, 1); got {bad}")
        percents = [round(100 * level) for level in levels]
        if len(set(percents)) != len(percents):
            raise ValueError(f"levels must be distinct in whole percent (their keys), got {list(levels)}")
        orders = tuple(orders)
        if not orders or any(order not in ORDERS for order in orders) or len(set(orders)) != len(orders):
            raise ValueError(f"orders must be distinct values of {list(ORDERS)}, got {list(orders)}")
        if not noise >= 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.levels, self.orders, self.noise, self.seed, self.chunk_size = levels, orders, noise, int(seed), chunk_size
        self.percents = percents
        keys = [f"road_{order}{kind}" for order in orders for kind in ("", "_probability")]
        super().__init__(per_image_keys=keys, **kwargs)
        zeros = torch.zeros(len(orders), len(levels), dtype=torch.float64)
        self.add_state("accuracy_sum", default=zeros.clone(), dist_reduce_fx="sum")
        self.add_state("probability_sum", default=zeros.clone(), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, batch: ScoredBatch) -> None:
        """Score one batch at every level and order (the maps' scale does not matter: only their order)."""
        images, maps = batch.images, batch.maps
        if not bool(torch.isfinite(maps).all()):
            raise ValueError("maps contain NaN or infinite values: the removal order would be undefined")
        pixels = images.shape[-2] * images.shape[-1]
        if round(max(self.levels) * pixels) >= pixels:
            raise ValueError(
                f"level {max(self.levels)} would remove all {pixels} pixels of {tuple(images.shape[-2:])} images"
            )
        size = images.shape[0]
        if size == 0:
            return
        targets = batch.targets.to(images.device)
        clean_predictions = batch.predictions.to(images.device)
        dataset_indices = batch.indices.tolist()
        accuracy = torch.zeros(len(self.orders), len(self.levels), size, dtype=torch.float64)
        probability = torch.zeros_like(accuracy)
        with torch.no_grad():
            for o, order in enumerate(self.orders):
                ranks = removal_ranks(maps.to(images.device), order)
                for l, level in enumerate(self.levels):  # noqa: E741
                    removed = (ranks < round(level * pixels)).view(size, *images.shape[-2:])
                    for start in range(0, size, self.chunk_size):
                        part = slice(start, start + self.chunk_size)
                        generators = [
                            torch.Generator(device=images.device).manual_seed(noise_seed(self.seed, i, level, order))
                            for i in dataset_indices[part]
                        ]
                        imputed = noisy_linear_impute(images[part], removed[part], self.noise, generators)
                        predictions: list[Tensor] = []

                        def recording(chunk: Tensor, out: list[Tensor] = predictions) -> Tensor:
                            logits = batch.model(chunk)
                            out.append(logits.argmax(dim=1))
                            return logits

                        probs = probabilities(recording, imputed, targets[part], self.chunk_size)
                        probability[o, l, part] = probs.double().cpu()
                        accuracy[o, l, part] = (torch.cat(predictions) == clean_predictions[part]).double().cpu()
        # out of place: states reset under inference mode (trainer.validate) stay usable afterwards
        self.accuracy_sum = self.accuracy_sum + accuracy.sum(dim=2).to(self.accuracy_sum.device)
        self.probability_sum = self.probability_sum + probability.sum(dim=2).to(self.probability_sum.device)
        self.count = self.count + size
        values = {}
        for o, order in enumerate(self.orders):
            values[f"road_{order}"] = accuracy[o].mean(dim=0)
            values[f"road_{order}_probability"] = probability[o].mean(dim=0)
        self.record(batch.indices, **values)

    def compute(self) -> dict[str, float]:
        count = max(int(self.count), 1)
        accuracy, probability = self.accuracy_sum / count, self.probability_sum / count
        result: dict[str, float] = {}
        for o, order in enumerate(self.orders):
            key = f"road_{order}"
            result[key] = float(accuracy[o].mean())
            result[f"{key}_probability"] = float(probability[o].mean())
            for i, percent in enumerate(self.percents):
                result[f"{key}@{percent}"] = float(accuracy[o, i])
                result[f"{key}_probability@{percent}"] = float(probability[o, i])
        return result

    def columns(self) -> list[Column]:
        columns = []
        for order in self.orders:  # the summary in the table; probabilities and levels in metrics.json/csv
            better, arrow = order == "lerf", "↑" if order == "lerf" else "↓"
            columns.append(Column(f"road_{order}", f"ROAD {_TITLES[order]} {arrow}", better, primary=True))
        for order in self.orders:
            better, arrow = order == "lerf", "↑" if order == "lerf" else "↓"
            key = f"road_{order}"
            columns.append(Column(f"{key}_probability", f"ROAD {_TITLES[order]} p {arrow}", better, table=False))
            for p in self.percents:
                columns.append(Column(f"{key}@{p}", f"ROAD {_TITLES[order]}@{p} {arrow}", better, table=False))
                columns.append(
                    Column(f"{key}_probability@{p}", f"ROAD {_TITLES[order]} p@{p} {arrow}", better, table=False)
                )
        return columns

    def curves(self) -> dict[str, Curve]:
        """Top-1 kept per removal level, one line per order in one ``road`` plot (synchronised)."""
        result = self.compute()
        return {
            f"road_{order}": Curve(
                "road", "ROAD (MoRF lower, LeRF higher is better)", "% of pixels removed", "top-1 kept",
                [100 * level for level in self.levels], [result[f"road_{order}@{p}"] for p in self.percents],
                label=_TITLES[order], style="-" if order == "morf" else "--", summary_key=f"road_{order}",
            )
            for order in self.orders
        }  # fmt: skip
