"""Pointing game (Zhang et al., 2016) and energy-based pointing game (Wang et al., Score-CAM, 2020)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["PointingGame", "box_mask"]


def box_mask(boxes: Tensor, height: int, width: int) -> Tensor:
    """``[H, W]`` bool: pixels whose centre lies in any of ``boxes`` ``[n, 4]`` (x0, y0, x1, y1, pixel edges)."""
    xs = torch.arange(width, device=boxes.device, dtype=torch.float32) + 0.5
    ys = torch.arange(height, device=boxes.device, dtype=torch.float32) + 0.5
    inside_x = (xs >= boxes[:, 0:1]) & (xs <= boxes[:, 2:3])  # [n, W]
    inside_y = (ys >= boxes[:, 1:2]) & (ys <= boxes[:, 3:4])  # [n, H]
    return (inside_y[:, :, None] & inside_x[:, None, :]).any(dim=0)


class PointingGame(Metric):
    """Both pointing games over the images that have a box of the explained class.

    Pointing game: a hit when the map's maximum (its first maximum, in raster order) lies within
    ``tolerance`` pixels of a box of the class. Energy-based pointing game: the share of the map's sum that
    falls inside the union of those boxes (a blank map scores 0). Images without a box of the explained
    class (e.g. a wrong top-1 on ImageNet, whose boxes are of the true class) are not counted, as in
    Zhang et al.'s (image, present class) pairs. ``boxes``: per image ``[n, 5]`` rows (class, x0, y0, x1, y1)
    in the map's pixel coordinates.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, tolerance: float = 15.0, **kwargs: object) -> None:
        super().__init__(**kwargs)
        if tolerance < 0:
            raise ValueError(f"pointing game tolerance must be >= 0 pixels, got {tolerance}")
        self.tolerance = float(tolerance)
        self.add_state("hits", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("energy", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, maps: Tensor, targets: Tensor, boxes: Sequence[Tensor]) -> None:
        if maps.dim() != 3 or len(boxes) != maps.shape[0] or targets.shape != maps.shape[:1]:
            raise ValueError(
                f"expected maps [B, H, W], targets [B] and B box tensors, got {tuple(maps.shape)}, "
                f"{tuple(targets.shape)} and {len(boxes)}"
            )
        height, width = maps.shape[-2:]
        hits = energy = 0.0
        count = 0
        for image_map, target, image_boxes in zip(maps.float(), targets.tolist(), boxes, strict=True):
            image_boxes = image_boxes.to(maps.device).float().view(-1, 5)
            own = image_boxes[image_boxes[:, 0] == target, 1:]
            if own.numel() == 0:
                continue
            count += 1
            peak = int(image_map.flatten().argmax())
            y, x = peak // width + 0.5, peak % width + 0.5
            dx = torch.clamp(torch.maximum(own[:, 0] - x, x - own[:, 2]), min=0)
            dy = torch.clamp(torch.maximum(own[:, 1] - y, y - own[:, 3]), min=0)
            hits += float((dx.square() + dy.square()).sqrt().min() <= self.tolerance)
            total = image_map.clamp_min(0).sum()
            if total > 0:
                energy += float(image_map.clamp_min(0)[box_mask(own, height, width)].sum() / total)
        self.hits = self.hits + hits
        self.energy = self.energy + energy
        self.count = self.count + count

    def compute(self) -> dict[str, Tensor]:
        count = self.count.clamp_min(1).double()
        return {
            "pointing_game": self.hits / count,
            "energy_pointing_game": self.energy / count,
            "pointing_images": self.count.double(),
        }
