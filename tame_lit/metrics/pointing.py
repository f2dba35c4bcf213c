"""Pointing game (Zhang et al., 2016) and energy-based pointing game (Wang et al., Score-CAM, 2020)."""

from __future__ import annotations

import torch
from torch import Tensor

from tame_lit.metrics.base import METRICS, Column, FaithfulnessMetric, ScoredBatch

__all__ = ["PointingGame", "box_mask", "class_boxes", "mass_inside"]


def box_mask(boxes: Tensor, height: int, width: int) -> Tensor:
    """``[H, W]`` bool: pixels whose centre lies in any of ``boxes`` ``[n, 4]`` (x0, y0, x1, y1, pixel edges)."""
    xs = torch.arange(width, device=boxes.device, dtype=torch.float32) + 0.5
    ys = torch.arange(height, device=boxes.device, dtype=torch.float32) + 0.5
    inside_x = (xs >= boxes[:, 0:1]) & (xs <= boxes[:, 2:3])  # [n, W]
    inside_y = (ys >= boxes[:, 1:2]) & (ys <= boxes[:, 3:4])  # [n, H]
    return (inside_y[:, :, None] & inside_x[:, None, :]).any(dim=0)


def class_boxes(image_boxes: Tensor, target: int) -> Tensor:
    """``[m, 4]`` (x0, y0, x1, y1): the boxes of class ``target`` among an image's ``[n, 5]`` rows."""
    image_boxes = image_boxes.float().view(-1, 5)
    return image_boxes[image_boxes[:, 0] == target, 1:]


def mass_inside(image_map: Tensor, mask: Tensor) -> float:
    """Share of the map's non-negative sum inside ``mask`` ``[H, W]`` (the energy-based pointing game, relevance
    mass accuracy); 0 for a blank map."""
    positive = image_map.clamp_min(0)
    total = positive.sum()
    return float(positive[mask].sum() / total) if total > 0 else 0.0


@METRICS.register("pointing")
class PointingGame(FaithfulnessMetric):
    """Both pointing games over the images that have a box of the explained class.

    Pointing game: a hit when the map's maximum (its first maximum, in raster order) lies within
    ``tolerance`` pixels of a box of the class. Energy-based pointing game: the share of the map's sum that
    falls inside the union of those boxes (a blank map scores 0). Images without a box of the explained
    class (e.g. a wrong top-1 on ImageNet, whose boxes are of the true class) are not counted, as in
    Zhang et al.'s (image, present class) pairs. ``boxes``: per image ``[n, 5]`` rows (class, x0, y0, x1, y1)
    in the map's pixel coordinates.
    """

    def __init__(self, tolerance: float = 15.0, **kwargs: object) -> None:
        if tolerance < 0:
            raise ValueError(f"pointing game tolerance must be >= 0 pixels, got {tolerance}")
        super().__init__(per_image_keys=("pointing_game", "energy_pointing_game"), **kwargs)
        self.tolerance = float(tolerance)
        self.add_state("hits", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("energy", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, batch: ScoredBatch) -> None:
        """Score the images of ``batch`` that have a box of their explained class (none without boxes)."""
        maps = batch.maps
        height, width = maps.shape[-2:]
        hits: list[float] = []
        energies: list[float] = []
        counted: list[int] = []
        boxes = batch.boxes if batch.boxes is not None else [torch.zeros(0, 5)] * batch.size
        for row, (image_map, target, image_boxes) in enumerate(
            zip(maps.float(), batch.targets.tolist(), boxes, strict=True)
        ):
            own = class_boxes(image_boxes.to(maps.device), target)
            if own.numel() == 0:
                continue
            counted.append(row)
            peak = int(image_map.flatten().argmax())
            y, x = peak // width + 0.5, peak % width + 0.5
            dx = torch.clamp(torch.maximum(own[:, 0] - x, x - own[:, 2]), min=0)
            dy = torch.clamp(torch.maximum(own[:, 1] - y, y - own[:, 3]), min=0)
            hits.append(float((dx.square() + dy.square()).sqrt().min() <= self.tolerance))
            energies.append(mass_inside(image_map, box_mask(own, height, width)))
        self.hits = self.hits + sum(hits)
        self.energy = self.energy + sum(energies)
        self.count = self.count + len(counted)
        self.record(
            batch.indices[counted] if counted else batch.indices[:0],
            pointing_game=torch.tensor(hits, dtype=torch.float64),
            energy_pointing_game=torch.tensor(energies, dtype=torch.float64),
        )

    def compute(self) -> dict[str, float]:
        """Both games over the counted images; nothing when no image had a box of its class."""
        count = int(self.count)
        if count == 0:
            return {}
        return {
            "pointing_game": float(self.hits) / count,
            "energy_pointing_game": float(self.energy) / count,
            "pointing_images": float(count),
        }

    def columns(self) -> list[Column]:
        return [
            Column("pointing_game", "Pointing ↑", True, share=True),
            Column("energy_pointing_game", "Energy PG ↑", True),
            Column("pointing_images", "pointing images", None, digits=0, table=False),
        ]
