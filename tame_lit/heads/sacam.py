"""SA-CAM as a trainable head: self-attention over spatial positions with an attention skip connection.

tame-lit's formulation (the paper, Liang, Li, Jiang, Neurocomputing 2022, is known from its abstract only;
methods.md §A): for each layer ``A' = A + gamma * V softmax(Q^T K / sqrt(d))^T`` with 1x1 projections
``Q, K: C -> C / reduction`` and ``V: C -> C`` and a learnable ``gamma`` that starts at 0, so training starts
from the plain features and learns the attention as a correction. The ``A'`` are resized to a common size,
concatenated and turned into one map per class by a 1x1 conv; ``init_from_classifier`` starts that conv
from the backbone's classifier, so the untrained head's map is exactly CAM.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tame_lit.heads.base import (
    HEADS,
    ExplanationHead,
    cam_default_layers,
    class_maps,
    common_size,
    start_from_cam,
    start_fuser_from_classifier,
)

if TYPE_CHECKING:
    from tame_lit.backbones import Backbone

__all__ = ["SACAMHead", "SpatialSelfAttention"]


class SpatialSelfAttention(nn.Module):
    """``x + gamma * Att(x)``: SAGAN-style attention over the ``h*w`` positions of one feature map.

    The attention runs in ``scaled_dot_product_attention``, whose fused kernels never hold the
    ``(h*w)^2`` score matrix (``math`` attention does, three times over with its backward). Those kernels
    need equal query and value widths: ``Q, K`` are zero-padded to a width ``W`` (a multiple of 8, at most
    256 unless ``d`` is wider; zeros add nothing to ``Q^T K``, the scale stays ``1/sqrt(d)``) and ``V`` is
    split into groups of ``W`` channels that share them. The result is exactly ``V S^T`` with one softmax
    ``S``; the price is ``Q^T K`` computed once per group (``h*w``^2 x C multiply-adds in all, as for ``V S^T``).
    """

    max_group_width: ClassVar[int] = 256  # the largest head width of the CUDA flash kernels

    def __init__(self, channels: int, reduction: int = 8, value_init: str = "identity") -> None:
        super().__init__()
        if reduction < 1:
            raise ValueError(f"reduction must be >= 1, got {reduction}")
        if value_init not in ("identity", "random"):
            raise ValueError(f"value_init must be 'identity' or 'random', got {value_init!r}")
        self.channels = int(channels)
        self.key_channels = max(1, self.channels // int(reduction))
        self.query = nn.Conv2d(self.channels, self.key_channels, kernel_size=1)
        self.key = nn.Conv2d(self.channels, self.key_channels, kernel_size=1)
        self.value = nn.Conv2d(self.channels, self.channels, kernel_size=1)
        if value_init == "identity":  # the branch starts as attention-weighted smoothing of the features
            with torch.no_grad():
                self.value.weight.copy_(torch.eye(self.channels).view(self.channels, self.channels, 1, 1))
                self.value.bias.zero_()
        self.gamma = nn.Parameter(torch.zeros(()))
        widest = min(_multiple_of_8(self.channels), self.max_group_width)
        self.group_width = max(_multiple_of_8(self.key_channels), widest)
        self.groups = math.ceil(self.channels / self.group_width)

    def attention(self, x: Tensor) -> Tensor:
        """``V S^T`` of ``x`` ``[B, C, h, w]``, as ``[B, C, h, w]``."""
        batch, channels, height, width = x.shape
        positions, group_width, groups = height * width, self.group_width, self.groups

        def by_position(t: Tensor, padded_width: int) -> Tensor:  # [B, c, h, w] -> [B, N, padded], contiguous
            t = t.flatten(2).transpose(1, 2)
            return F.pad(t, (0, padded_width - t.shape[-1])) if padded_width > t.shape[-1] else t.contiguous()

        shape = (batch, groups, positions, group_width)
        query = by_position(self.query(x), group_width).unsqueeze(1).expand(shape)
        key = by_position(self.key(x), group_width).unsqueeze(1).expand(shape)
        value = by_position(self.value(x), groups * group_width).view(batch, positions, groups, group_width)
        out = F.scaled_dot_product_attention(
            query, key, value.transpose(1, 2), scale=1.0 / math.sqrt(self.key_channels)
        )  # [B, G, N, W]
        out = out.transpose(1, 2).reshape(batch, positions, groups * group_width)[..., :channels]
        return out.transpose(1, 2).reshape(batch, channels, height, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.gamma.to(x.dtype) * self.attention(x)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, key_channels={self.key_channels}"


@HEADS.register("sacam")
class SACAMHead(ExplanationHead):
    """Attention skip connections on the chosen layers, resize to a common size, concatenation, 1x1 conv.

    ``attention_layers``: the layers that get an attention branch (default: all). Attention costs
    ``(h*w)^2`` per image in time, so a 56x56 layer can be left out. ``reduction``: ``Q, K`` have
    ``C / reduction`` channels. ``max_size``: the common size is the first layer's, capped at this.
    ``value_init``: ``identity`` starts ``V`` as the identity, so a growing ``gamma`` mixes in an
    attention-weighted smoothing of the features (methods.md §A's parameter-free form) rather than a random
    projection of them; ``random`` is SAGAN's initialisation.
    """

    def __init__(
        self,
        layer_shapes: Mapping[str, Sequence[int]],
        num_classes: int,
        attention_layers: Sequence[str] | None = None,
        reduction: int = 8,
        max_size: int = 56,
        value_init: str = "identity",
        explanation: str = "logits",
        smoothing: float = 0.0,
    ) -> None:
        super().__init__(layer_shapes, num_classes, explanation, smoothing)
        chosen = self.layers if attention_layers is None else tuple(attention_layers)
        unknown = [name for name in chosen if name not in self.layer_shapes]
        if unknown:
            raise ValueError(f"attention_layers {unknown} are not among the head's layers {list(self.layers)}")
        self.attention_layers = tuple(name for name in self.layers if name in chosen)
        if len({_key(name) for name in self.attention_layers}) != len(self.attention_layers):
            raise ValueError(f"attention_layers {list(self.attention_layers)} differ only in '.' vs '_'")
        self.max_size = int(max_size)
        self.reduction = int(reduction)
        self.attention = nn.ModuleDict(
            {
                _key(name): SpatialSelfAttention(self.layer_shapes[name][0], reduction, value_init)
                for name in self.attention_layers
            }
        )
        channels = sum(shape[0] for shape in self.layer_shapes.values())
        self.fuser = nn.Conv2d(channels, num_classes, kernel_size=1, bias=True)

    @classmethod
    def from_backbone(
        cls, backbone: Backbone, layers: Sequence[str] | None = None, init_from_classifier: bool = True,
        **options: object,
    ) -> SACAMHead:  # fmt: skip
        """Default layers: the backbone's default layers with the last replaced by its CAM layer (the
        features its classifier pools). ``init_from_classifier`` (default): start the fusion conv from that
        classifier (zeros for the other layers), so the untrained map is CAM; needs the CAM layer among the
        layers, global average pooling and one linear layer after it (ResNet, EfficientNet; not VGG: there
        pass False)."""
        head = cls(backbone.layer_shapes(layers or cam_default_layers(backbone)), backbone.num_classes, **options)
        if init_from_classifier:
            start_from_cam(head, backbone)
        return head

    def start_from_classifier(self, weight: Tensor, bias: Tensor | None, layer: str | None = None) -> None:
        """Fusion conv = ``weight`` on ``layer``'s channels (default: the last layer's) and zeros elsewhere: with
        ``gamma = 0``, ``conv(concat(Up(A_l))) = Up(W A_layer + b)``, the CAM (bilinear resizing and a 1x1 conv
        commute)."""
        widths = [shape[0] for shape in self.layer_shapes.values()]
        index = self.layers.index(layer) if layer is not None else len(widths) - 1
        start_fuser_from_classifier(self.fuser, widths, index, weight, bias)

    def forward(self, features: Mapping[str, Tensor], classes: Tensor | None = None) -> Tensor:
        inputs = self.check_features(features)
        size = common_size(inputs, self.max_size)
        refined = [
            self.attention[_key(name)](x) if name in self.attention_layers else x
            for name, x in zip(self.layers, inputs, strict=True)
        ]
        return class_maps(self.fuser, refined, size, classes)

    def gammas(self) -> dict[str, float]:
        """Each attention layer's ``gamma``: how much attention the training has mixed in."""
        return {name: float(self.attention[_key(name)].gamma.detach()) for name in self.attention_layers}

    def extra_repr(self) -> str:
        return (
            f"attention_layers={list(self.attention_layers)}, reduction={self.reduction}, max_size={self.max_size}, "
            f"explanation={self.explanation!r}, smoothing={self.smoothing}"
        )


def _multiple_of_8(value: int) -> int:
    return 8 * math.ceil(value / 8)


def _key(layer: str) -> str:
    """Module-dict keys cannot contain dots; layer names (``blocks.4``) do."""
    return layer.replace(".", "_")
