"""What every trainable explanation head is: features of named layers in, per-class map logits out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = ["ExplanationHead", "select_classes"]


class ExplanationHead(nn.Module):
    """Base class of trainable heads.

    A head is built from the per-image shapes of the layers it reads (``{name: (C, H, W)}``) and the
    number of classes, so it never needs the backbone itself. ``forward(features, classes)`` returns the
    pre-sigmoid class maps ``[B, K, h, w]``; with ``classes`` (a 1-D LongTensor) only those K maps are
    computed, which is all the training objective needs and much cheaper than all 1,000.
    """

    def __init__(self, layer_shapes: Mapping[str, Sequence[int]], num_classes: int) -> None:
        super().__init__()
        if not layer_shapes:
            raise ValueError("a head needs at least one layer")
        self.layers: tuple[str, ...] = tuple(layer_shapes)
        self.layer_shapes = {name: tuple(int(s) for s in shape) for name, shape in layer_shapes.items()}
        self.num_classes = int(num_classes)

    def forward(self, features: Mapping[str, Tensor], classes: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def check_features(self, features: Mapping[str, Tensor]) -> list[Tensor]:
        """The head's inputs in layer order, with a clear error when one is missing or has other channels."""
        ordered = []
        for name in self.layers:
            if name not in features:
                raise KeyError(f"{type(self).__name__} reads layer {name!r}, but got features of {list(features)}")
            value = features[name]
            if value.dim() != 4 or value.shape[1] != self.layer_shapes[name][0]:
                raise ValueError(
                    f"layer {name!r} gives {tuple(value.shape)}; the head was built for "
                    f"[B, {self.layer_shapes[name][0]}, H, W]"
                )
            ordered.append(value)
        return ordered


def select_classes(maps: Tensor, classes: Tensor | None, labels: Tensor) -> Tensor:
    """Each image's map of its own label, ``[B, h, w]``, from maps of all or of ``classes`` only."""
    if classes is not None:
        labels = torch.searchsorted(classes, labels)
    return maps[torch.arange(maps.shape[0], device=maps.device), labels]
