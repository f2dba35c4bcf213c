"""Localisation with boxes, beside the pointing games: relevance mass and relevance rank accuracy (Arras et al.,
Information Fusion 2022) and the IoU of a map's top pixels with the boxes.

Each scores the images that have a box of the explained class (as the pointing games do), against the union of
those boxes, and keeps each image's value.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tame_lit.maps import top_set
from tame_lit.metrics.base import METRICS, ImageMean, ScoredBatch
from tame_lit.metrics.pointing import box_mask, class_boxes, mass_inside

__all__ = ["BoxIoU", "BoxLocalisation", "RelevanceMass", "RelevanceRank", "top_k_inside"]


def top_k_inside(image_map: Tensor, mask: Tensor) -> float:
    """Share of the map's K highest pixels inside ``mask``, K = the mask's pixel count (ties broken by position:
    the earlier pixel ranks first)."""
    values, inside = image_map.flatten(), mask.flatten()
    count = int(inside.sum())
    # the K-th highest value by selection (no sort): the pixels above it, then the first of those equal to it
    threshold = torch.kthvalue(values, values.numel() - count + 1).values
    above, tied = values > threshold, values == threshold
    chosen = above | (tied & (tied.cumsum(0) <= count - int(above.sum())))
    return int((chosen & inside).sum()) / count


class BoxLocalisation(ImageMean):
    """The shared loop: for each image with a box of its explained class, ``score(map, mask)`` against the union
    mask of those boxes (the mean is over those images). ``boxes``: per image ``[n, 5]`` rows (class, x0, y0,
    x1, y1) in the map's pixels."""

    higher_is_better = True

    def score(self, image_map: Tensor, mask: Tensor) -> float:
        raise NotImplementedError

    def update(self, batch: ScoredBatch) -> None:
        height, width = batch.maps.shape[-2:]
        boxes = batch.boxes if batch.boxes is not None else [torch.zeros(0, 5)] * batch.size
        rows, values = [], []
        for row, (image_map, target, image_boxes) in enumerate(
            zip(batch.maps.float(), batch.targets.tolist(), boxes, strict=True)
        ):
            own = class_boxes(image_boxes.to(batch.maps.device), target)
            if own.numel() == 0:
                continue
            rows.append(row)
            values.append(self.score(image_map, box_mask(own, height, width)))
        self.add(batch.indices[rows], torch.tensor(values, dtype=torch.float64))


@METRICS.register("relevance_mass")
class RelevanceMass(BoxLocalisation):
    """Relevance mass accuracy: the share of the map's (non-negative) sum inside the boxes; 0 for a blank map.
    The energy-based pointing game's definition (``pointing``), as its own switch; Quantus's
    ``RelevanceMassAccuracy`` gives NaN for a blank map."""

    key = "relevance_mass"
    title = "Rel. mass ↑"

    def score(self, image_map: Tensor, mask: Tensor) -> float:
        return mass_inside(image_map, mask)


@METRICS.register("relevance_rank")
class RelevanceRank(BoxLocalisation):
    """Relevance rank accuracy: with K the boxes' pixel count, the share of the map's K highest pixels inside
    the boxes (1: the map ranks the object first)."""

    key = "relevance_rank"
    title = "Rel. rank ↑"

    def score(self, image_map: Tensor, mask: Tensor) -> float:
        return top_k_inside(image_map, mask)


@METRICS.register("box_iou")
class BoxIoU(BoxLocalisation):
    """IoU of the map's top ``top`` share of pixels (exactly ceil(top * H * W), ties by position: the pixels
    AD/IC keeps) with the boxes' union. Default 15 %, the share of AD@15 and of TAME's tightest check."""

    key = "box_iou"
    title = "Box IoU ↑"

    def __init__(self, top: float = 0.15, **kwargs: object) -> None:
        if not 0.0 < top <= 1.0:
            raise ValueError(f"box_iou.top must be a share of pixels in (0, 1], got {top}")
        super().__init__(**kwargs)
        self.top = float(top)

    def score(self, image_map: Tensor, mask: Tensor) -> float:
        kept = top_set(image_map[None], self.top)[0]
        return float((kept & mask).sum() / (kept | mask).sum())
