"""TAME's attention head (Ntrougkas, Gkalelis, Mezaris, ISM 2022): multi-layer feature fusion, and the
ablation variants of the original code (tame.md §1.5), so the ablation study can be reproduced."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
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

__all__ = ["VARIANTS", "FeatureBranch", "TameHead"]

# variant -> (branch output is the class count, batch norm, skip connection, activation); tame.md §1.2, §1.5
VARIANTS: dict[str, tuple[bool, bool, bool, str]] = {
    "standard": (False, True, True, "relu"),  # TAME: conv -> BN -> + input -> ReLU
    "no_skip": (True, True, False, "relu"),  # "Noskipconnection": conv C -> classes -> BN -> ReLU
    "no_skip_no_bn": (False, False, False, "relu"),  # "NoskipNobatchnorm": conv C -> C -> ReLU
    "sigmoid_in_branch": (False, True, True, "sigmoid"),  # "Sigmoidinfeaturebranch": sigmoid for ReLU
}


class FeatureBranch(nn.Module):
    """1x1 conv -> (batch norm) -> (+ input) -> activation; standard TAME keeps the layer's channels."""

    def __init__(
        self, channels: int, out_channels: int | None = None, batch_norm: bool = True, skip: bool = True,
        activation: str = "relu",
    ) -> None:  # fmt: skip
        super().__init__()
        out_channels = channels if out_channels is None else out_channels
        if skip and out_channels != channels:
            raise ValueError(f"a skip connection needs {channels} output channels (the input's), got {out_channels}")
        if activation not in ("relu", "sigmoid"):
            raise ValueError(f"activation must be 'relu' or 'sigmoid', got {activation!r}")
        self.conv = nn.Conv2d(channels, out_channels, kernel_size=1, bias=True)
        self.bn = nn.BatchNorm2d(out_channels) if batch_norm else nn.Identity()
        self.skip = skip
        self.activation = torch.relu if activation == "relu" else torch.sigmoid

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn(self.conv(x))
        return self.activation(x + y if self.skip else y)


@HEADS.register("tame")
class TameHead(ExplanationHead):
    """Per-layer branches, bilinear resize to the first layer's size capped at ``max_size``, concatenation,
    and a 1x1 fusion conv to one map per class. Returns logits; the training mask is their sigmoid.

    ``variant``: ``standard`` (TAME), or one of the original code's ablations ``no_skip``,
    ``no_skip_no_bn``, ``sigmoid_in_branch`` (see ``VARIANTS``). ``no_skip`` branches map each layer to
    one channel per class, so its fusion conv reads ``layers x classes`` channels. ``from_backbone(...,
    init_from_classifier=True)`` starts the head as CAM (``start_from_classifier``).
    """

    clips_negative_features = True  # its branches end in ReLU

    def __init__(
        self,
        layer_shapes: Mapping[str, Sequence[int]],
        num_classes: int,
        max_size: int = 56,
        variant: str = "standard",
        explanation: str = "logits",
        smoothing: float = 0.0,
    ) -> None:
        super().__init__(layer_shapes, num_classes, explanation, smoothing)
        if variant not in VARIANTS:
            raise ValueError(f"unknown TAME variant {variant!r}; valid: {list(VARIANTS)}")
        self.max_size = int(max_size)
        self.variant = variant
        to_classes, batch_norm, skip, activation = VARIANTS[variant]
        channels = [shape[0] for shape in self.layer_shapes.values()]
        outputs = [num_classes if to_classes else c for c in channels]
        self.branches = nn.ModuleList(
            FeatureBranch(c, out, batch_norm=batch_norm, skip=skip, activation=activation)
            for c, out in zip(channels, outputs, strict=True)
        )
        self.fuser = nn.Conv2d(sum(outputs), num_classes, kernel_size=1, bias=True)

    @classmethod
    def from_backbone(
        cls, backbone: Backbone, layers: Sequence[str] | None = None, init_from_classifier: bool = False,
        **options: object,
    ) -> TameHead:  # fmt: skip
        """Default layers: the backbone's default layers. ``init_from_classifier``: start from CAM
        (``start_from_classifier``); the default layers are then the backbone's default layers with the last
        replaced by its CAM layer, and given layers must include the CAM layer. Only the ``standard`` variant,
        on networks with global average pooling and one linear layer after the CAM layer (ResNet,
        EfficientNet; not VGG)."""
        if not init_from_classifier:
            return super().from_backbone(backbone, layers, **options)
        head = cls(backbone.layer_shapes(layers or cam_default_layers(backbone)), backbone.num_classes, **options)
        start_from_cam(head, backbone)
        return head

    @torch.no_grad()
    def start_from_classifier(self, weight: Tensor, bias: Tensor | None, layer: str | None = None) -> None:
        """Start as the CAM of ``layer`` (default: the last layer), for the ``standard`` variant only.

        Each branch ``relu(x + BN(conv(x)))`` gets BN weight and bias 0 (a zero-init residual), so it gives
        ``relu(x)``, in train and eval mode alike: the features themselves where they are non-negative, as
        post-ReLU / ReLU6 CAM layers are (ResNet ``layer4``, Lite0 ``bn2``). The fusion conv gets the
        classifier on ``layer``'s channels and zeros elsewhere (``start_fuser_from_classifier``), so the maps
        are ``resize(W A + b)``, CAM, whatever the other branches give. The branch convs keep their random
        init: BN normalises their output, so a zero BN weight gets a gradient as soon as the fusion reads its
        branch (at once for ``layer``'s, after the first step for the others); with a zero conv as well,
        nothing in the branch would ever get one.
        """
        if self.variant != "standard":
            raise ValueError(
                f"TAME variant {self.variant!r} cannot start from the classifier (init_from_classifier): only "
                "'standard' can, whose branches start as the identity relu(x + 0)"
            )
        for branch in self.branches:
            branch.bn.weight.zero_()
            branch.bn.bias.zero_()
        widths = [shape[0] for shape in self.layer_shapes.values()]  # standard branches keep their channels
        index = self.layers.index(layer) if layer is not None else len(widths) - 1
        start_fuser_from_classifier(self.fuser, widths, index, weight, bias)

    def forward(self, features: Mapping[str, Tensor], classes: Tensor | None = None) -> Tensor:
        inputs = self.check_features(features)
        size = common_size(inputs, self.max_size)
        branches = [branch(x) for branch, x in zip(self.branches, inputs, strict=True)]
        return class_maps(self.fuser, branches, size, classes)

    def extra_repr(self) -> str:
        return (
            f"variant={self.variant!r}, max_size={self.max_size}, explanation={self.explanation!r}, "
            f"smoothing={self.smoothing}"
        )
