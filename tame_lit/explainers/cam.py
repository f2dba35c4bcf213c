"""CAM (Zhou et al., CVPR 2016): the classifier's weights of the target class applied to the last conv features."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from tame_lit.backbones import Backbone
from tame_lit.explainers.base import EXPLAINERS, LayerExplainer, to_maps

__all__ = ["CAM"]


@EXPLAINERS.register("cam")
class CAM(LayerExplainer):
    """``L = sum_k w^c_k A^k + b_c``, min-max normalised (no ReLU: CAM as published), then upsampled.

    Exact only for networks that end in global average pooling and one linear layer (ResNet, EfficientNet),
    read at the features before the pooling (the backbone's CAM layer); others are refused when built.
    One forward pass, no gradients. The starting point of the SA-CAM head with ``init_from_classifier``.
    """

    def __init__(self, backbone: Backbone, layers: Sequence[str] | str | None = None) -> None:
        super().__init__(backbone, layers)
        self.classifier = backbone.linear_classifier(self.layer)

    def explain(self, images: Tensor, targets: Tensor | None) -> Tensor:
        logits, captured = self.forward_layers(images)
        targets = self.resolve_targets(logits, targets)
        activations = captured[self.layer].float()
        cam = torch.einsum("bchw,bc->bhw", activations, self.classifier.weight.float()[targets])
        if self.classifier.bias is not None:
            cam = cam + self.classifier.bias.float()[targets][:, None, None]
        return to_maps(cam, images.shape[-2:])
