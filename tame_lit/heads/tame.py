"""TAME's attention head (Ntrougkas, Gkalelis, Mezaris, ISM 2022): multi-layer feature fusion."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tame_lit.heads.base import ExplanationHead

__all__ = ["FeatureBranch", "TameHead"]


class FeatureBranch(nn.Module):
    """1x1 conv -> batch norm -> + input -> ReLU, keeping the layer's channels (spec tame.md §1.2)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=1, bias=True)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.bn(self.conv(x)))


class TameHead(ExplanationHead):
    """Per-layer branches, bilinear resize to the first layer's size capped at ``max_size``, concatenation,
    and a 1x1 fusion conv to one map per class. Returns logits; the training mask is their sigmoid."""

    def __init__(self, layer_shapes: Mapping[str, Sequence[int]], num_classes: int, max_size: int = 56) -> None:
        super().__init__(layer_shapes, num_classes)
        self.max_size = int(max_size)
        channels = [shape[0] for shape in self.layer_shapes.values()]
        self.branches = nn.ModuleList(FeatureBranch(c) for c in channels)
        self.fuser = nn.Conv2d(sum(channels), num_classes, kernel_size=1, bias=True)

    def forward(self, features: Mapping[str, Tensor], classes: Tensor | None = None) -> Tensor:
        inputs = self.check_features(features)
        size = tuple(min(s, self.max_size) for s in inputs[0].shape[-2:])
        fused = [resize(branch(x), size) for branch, x in zip(self.branches, inputs, strict=True)]
        stacked = torch.cat(fused, dim=1)
        if classes is None:
            return self.fuser(stacked)
        return F.conv2d(stacked, self.fuser.weight[classes], self.fuser.bias[classes])


def resize(x: Tensor, size: tuple[int, ...]) -> Tensor:
    """Bilinear resize (align_corners=False, as the original); a no-op at the same size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
