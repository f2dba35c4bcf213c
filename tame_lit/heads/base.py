"""What every trainable explanation head is: features of named layers in, per-class map logits out."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tame_lit.features import preserved_state
from tame_lit.maps import normalize, smooth, upsample
from tame_lit.registry import Registry

if TYPE_CHECKING:
    from tame_lit.backbones import Backbone

__all__ = [
    "HEADS",
    "ExplanationHead",
    "cam_default_layers",
    "class_maps",
    "common_size",
    "head_maps",
    "ranking_maps",
    "resize",
    "select_classes",
    "start_from_cam",
    "start_fuser_from_classifier",
    "target_maps",
    "training_masks",
]

# how a head's map of a class becomes its explanation (``target_maps``)
EXPLANATIONS = ("logits", "mask")
# weight of the min-max logits in a ``mask`` explanation: enough to order pixels where the sigmoid saturates
MASK_TIE_BREAK = 1e-3


class ExplanationHead(nn.Module):
    """Base class of trainable heads.

    A head is built from the per-image shapes of the layers it reads (``{name: (C, H, W)}``) and the
    number of classes, so it never needs the backbone itself. ``forward(features, classes)`` returns the
    pre-sigmoid class maps ``[B, K, h, w]``; with ``classes`` (a 1-D LongTensor) only those K maps are
    computed, which is all the training objective needs and much cheaper than all 1,000. ``explanation``:
    how a class map becomes an explanation (``target_maps``): ``logits`` (TAME) or ``mask``. ``smoothing``:
    the standard deviation, in cells of the head's map, of a Gaussian blur of the explanation (0: none).
    ``clips_negative_features``: started from the classifier, the head passes the CAM layer's features through a
    ReLU, so its start is CAM only where they are non-negative (``start_from_cam`` checks).
    """

    clips_negative_features: bool = False

    def __init__(
        self,
        layer_shapes: Mapping[str, Sequence[int]],
        num_classes: int,
        explanation: str = "logits",
        smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if not layer_shapes:
            raise ValueError("a head needs at least one layer")
        if explanation not in EXPLANATIONS:
            raise ValueError(f"head explanation must be one of {list(EXPLANATIONS)}, got {explanation!r}")
        self.explanation = explanation
        self.smoothing = check_smoothing(smoothing)
        self.layers: tuple[str, ...] = tuple(layer_shapes)
        self.layer_shapes = {name: tuple(int(s) for s in shape) for name, shape in layer_shapes.items()}
        self.num_classes = int(num_classes)

    @classmethod
    def from_backbone(cls, backbone: Backbone, layers: Sequence[str] | None = None, **options: object):
        """The head for ``backbone``, reading ``layers`` (default: the backbone's default layers).

        Heads that need more of the backbone than its layer shapes (e.g. its classifier, to start from CAM)
        override this; ``heads.create`` and every checkpoint or export loader build heads through it.
        """
        layers = tuple(layers) if layers else backbone.default_layers
        return cls(backbone.layer_shapes(layers), backbone.num_classes, **options)

    def forward(self, features: Mapping[str, Tensor], classes: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def start_from_classifier(self, weight: Tensor, bias: Tensor | None, layer: str | None = None) -> None:
        """Start from the linear classifier ``weight, bias`` on ``layer``'s global average (default: the last
        layer), so that the untrained maps are that layer's CAM; ``start_from_cam`` calls it. Heads that can
        (SA-CAM, standard TAME) override this."""
        raise NotImplementedError(f"{type(self).__name__} cannot start from the classifier")

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


# name -> head class; each head's file registers itself (``@HEADS.register("name")``)
HEADS: Registry[type[ExplanationHead]] = Registry("head")


def select_classes(maps: Tensor, classes: Tensor | None, labels: Tensor) -> Tensor:
    """Each image's map of its own label, ``[B, h, w]``, from maps of all or of ``classes`` only."""
    if classes is not None:
        labels = torch.searchsorted(classes, labels)
    return maps[torch.arange(maps.shape[0], device=maps.device), labels]


def head_maps(head: ExplanationHead, features: Mapping[str, Tensor], targets: Tensor, size: Sequence[int]) -> Tensor:
    """Each image's explanation for its target (``target_maps`` of the head's map of that class); what
    explainers, validation and exports compute."""
    classes = torch.unique(targets)
    logits = head(features, classes)
    return target_maps(select_classes(logits, classes, targets), size, head.explanation, head.smoothing)


def check_smoothing(smoothing: float) -> float:
    """``smoothing`` as a float, or a ValueError saying what is valid."""
    if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not 0 <= smoothing < math.inf:
        raise ValueError(
            f"head smoothing must be a standard deviation >= 0 in cells of the head's map (0: none), got {smoothing!r}"
        )
    return float(smoothing)


def smooth_cells(maps: Tensor, smoothing: float, low: Sequence[int]) -> Tensor:
    """Upsampled ``[B, H, W]`` maps blurred by ``smoothing`` cells of the ``low``-sized map they came from
    (``maps.smooth``, per axis in pixels); unchanged when ``smoothing`` is 0."""
    if smoothing == 0:
        return maps
    return smooth(maps, (smoothing * maps.shape[-2] / low[0], smoothing * maps.shape[-1] / low[1]))


def training_masks(logits: Tensor, size: Sequence[int], smoothing: float = 0.0) -> Tensor:
    """The masks ``[B, *size]`` training multiplies the images by: the sigmoid of each map, upsampled, blurred
    as ``target_maps`` blurs the explanation, so that a smoothed head learns the mask its explanations are."""
    return smooth_cells(upsample(torch.sigmoid(logits), tuple(size)), smoothing, logits.shape[-2:])


def ranking_maps(logits: Tensor, size: Sequence[int], smoothing: float = 0.0) -> Tensor:
    """What orders the pixels of a head's explanations, unsaturated: the min-max upsampled logits, blurred as
    ``target_maps`` blurs. The ``mask`` explanation's sigmoid flattens large regions to 1.0, so training terms
    that rank pixels (``loss.deleted``) rank by these to give pixels near their threshold a gradient."""
    maps = normalize(upsample(logits, tuple(size)))
    return normalize(smooth_cells(maps, smoothing, logits.shape[-2:])) if smoothing else maps


def target_maps(logits: Tensor, size: Sequence[int], explanation: str = "logits", smoothing: float = 0.0) -> Tensor:
    """Explanations ``[B, *size]`` in [0, 1] from each image's pre-sigmoid map of its target ``[B, h, w]``.

    ``logits``: min-max at the head's resolution, then bilinear upsampling (TAME, tame.md §1.4).
    ``mask``: the mask the head was trained to apply, sigmoid(logits) after upsampling, min-max; plus
    ``MASK_TIE_BREAK`` x the min-max upsampled logits, so that where the sigmoid saturates (1.0 in float32)
    pixels keep the logits' order. The pixel order, hence deletion, insertion and ROAD, is that of the
    upsampled logits (pixels whose logits differ by less than about 1e-4 of their range may tie in float32);
    the values are the trained mask's, which is what AD/IC multiply the image by.

    ``smoothing`` > 0: that explanation blurred by a Gaussian of that standard deviation in cells of the head's
    ``[h, w]`` map (``maps.smooth``), min-max again. A saturated mask's plateau then ranks its centre first and
    the map's order has no detail finer than the blur: on Lite0 this lowers the deletion AUC (README, "Which
    explainer is most faithful?").
    """
    if explanation == "logits":
        maps = upsample(normalize(logits), tuple(size))
    elif explanation == "mask":
        upsampled = upsample(logits, tuple(size))
        maps = normalize((1 - MASK_TIE_BREAK) * torch.sigmoid(upsampled) + MASK_TIE_BREAK * normalize(upsampled))
    else:
        raise ValueError(f"explanation must be one of {list(EXPLANATIONS)}, got {explanation!r}")
    return normalize(smooth_cells(maps, smoothing, logits.shape[-2:])) if smoothing else maps


def class_maps(fuser: nn.Conv2d, inputs: Sequence[Tensor], size: Sequence[int], classes: Tensor | None) -> Tensor:
    """The fusion of multi-layer heads: ``fuser(concat(resize(x) for x in inputs))``, for all classes or only
    for ``classes`` (their rows of the 1x1 conv).

    A 1x1 conv and bilinear resizing commute (both linear, interpolation weights sum to 1), so with fewer
    output maps than resized input channels each layer is convolved at its own size and only its maps are
    resized: the same maps (up to rounding) without the ``[B, sum C, h, w]`` stack. With ``classes`` (what
    training and explaining ask for) that is always the case; for all classes it is decided from the shapes.
    """
    weight = fuser.weight if classes is None else fuser.weight[classes]
    bias = fuser.bias if classes is None or fuser.bias is None else fuser.bias[classes]
    resized = sum(x.shape[1] for x in inputs if tuple(x.shape[-2:]) != tuple(size))
    if classes is None and weight.shape[0] >= resized:
        return F.conv2d(torch.cat([resize(x, size) for x in inputs], dim=1), weight, bias)
    maps, start = None, 0
    for x in inputs:
        part = resize(F.conv2d(x, weight[:, start : start + x.shape[1]]), size)
        maps = part if maps is None else maps + part
        start += x.shape[1]
    return maps if bias is None else maps + bias.view(1, -1, 1, 1).to(maps.dtype)


def resize(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize (align_corners=False, as the original TAME); a no-op at the same size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def common_size(inputs: Sequence[Tensor], max_size: int) -> tuple[int, int]:
    """Where multi-layer heads fuse: the first layer's size, each side capped at ``max_size`` (tame.md §1.2)."""
    return tuple(min(int(s), max_size) for s in inputs[0].shape[-2:])


def cam_default_layers(backbone: Backbone) -> tuple[str, ...]:
    """Where heads that start from CAM read by default: the backbone's default layers with the last replaced by
    its CAM layer (the features its classifier pools), e.g. Lite0 ``blocks.2, blocks.4, bn2``."""
    return tuple(dict.fromkeys((*backbone.default_layers[:-1], backbone.cam_layer)))


def start_from_cam(head: ExplanationHead, backbone: Backbone) -> None:
    """``init_from_classifier``: start ``head`` from ``backbone``'s classifier, so that its untrained maps are CAM.

    The head must read the backbone's CAM layer (anywhere among its layers); the classifier is the linear layer
    that turns that layer's global average into the logits (``Backbone.linear_classifier``, which refuses
    networks without one, such as VGG's three FC layers). The head's own ``start_from_classifier(weight, bias,
    layer)`` puts it in place (``start_fuser_from_classifier``, plus whatever makes its branches pass that
    layer's features through unchanged).
    """
    layer = backbone.cam_layer
    if layer not in head.layers:
        raise ValueError(
            f"init_from_classifier starts from the classifier on {backbone.name}'s CAM layer {layer!r}, but the "
            f"head's layers {list(head.layers)} do not include it: add {layer!r} to the layers "
            "(or pass init_from_classifier=False)"
        )
    linear = backbone.linear_classifier(layer)
    if head.clips_negative_features:
        probe = torch.rand(2, 3, *backbone.input_size, generator=torch.Generator().manual_seed(0))
        with preserved_state(backbone), torch.no_grad():
            backbone.eval()
            _, features = backbone.features(probe.to(backbone.mean.device), [layer])
        lowest = features[layer].min().item()
        if lowest < 0:
            raise ValueError(
                f"{type(head).__name__} started from the classifier passes the CAM layer through a ReLU, so it is CAM "
                f"only on non-negative features (a CNN layer after its ReLU); {backbone.name}'s layer {layer!r} has "
                f"negative values ({lowest:.3g} on noise images, as a transformer's normalised tokens have): use "
                "head=sacam, whose start is CAM on any features, or init_from_classifier=false"
            )
    head.start_from_classifier(linear.weight, linear.bias, layer)


@torch.no_grad()
def start_fuser_from_classifier(
    fuser: nn.Conv2d, widths: Sequence[int], index: int, weight: Tensor, bias: Tensor | None
) -> None:
    """Fusion conv = the classifier's ``weight`` on the channels of input ``index`` and zeros on the others'
    (``class_maps`` concatenates the inputs in order, ``widths[i]`` channels each), bias = the classifier's.

    When input ``index`` reaches the fusion as the CAM layer's features A, the maps are
    ``resize(W A + b)``: the CAM of every class (bilinear resizing and a 1x1 conv commute).
    """
    widths = [int(w) for w in widths]
    if fuser.in_channels != sum(widths) or fuser.kernel_size != (1, 1):
        raise ValueError(f"the fusion conv {fuser} does not read inputs of {widths} channels with a 1x1 kernel")
    start, width = sum(widths[:index]), widths[index]
    if tuple(weight.shape) != (fuser.out_channels, width):
        raise ValueError(f"classifier weight {tuple(weight.shape)} does not fit [{fuser.out_channels}, {width}]")
    fuser.weight.zero_()
    fuser.weight[:, start : start + width, 0, 0] = weight.to(fuser.weight)
    if fuser.bias is not None:
        if bias is None:
            fuser.bias.zero_()
        else:
            fuser.bias.copy_(bias)
