"""The one call every explainer answers, ``explainer(images, targets=None) -> maps``, and the shared
machinery of the layer-based methods (activation capture, gradients to a layer, map post-processing)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from tame_lit.backbones import Backbone
from tame_lit.features import check_layers, preserved_state
from tame_lit.maps import normalize, upsample

__all__ = ["BASELINES", "Explainer", "GradientCAM", "LayerExplainer", "chunks", "perturbed_logits", "to_maps"]


class Explainer:
    """Base of trained heads and classic CAM methods alike.

    ``images``: float ``[B, 3, H, W]`` in [0, 1] on any device; ``targets``: ``LongTensor[B]`` of class
    indices, or ``None`` for each image's top-1 class. Returns float32 ``[B, H, W]`` maps in [0, 1] on the
    images' device. Subclasses implement ``explain(images, targets)``; this class checks the inputs, runs
    it with the backbone in eval mode and its state (modes, ``requires_grad``) restored afterwards, enables
    gradients for methods that need them (also inside ``inference_mode``/``no_grad``), and checks the
    result. Maps are computed in float32, also under autocast.
    """

    needs_gradients: ClassVar[bool] = False

    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone

    @property
    def num_classes(self) -> int:
        return self.backbone.num_classes

    def __call__(self, images: Tensor, targets: Tensor | None = None) -> Tensor:
        self.check_images(images)
        if targets is not None:
            targets = self.check_targets(targets, images.shape[0]).to(images.device)
        with preserved_state(self.backbone), contextlib.ExitStack() as stack:
            # explain the model as it predicts: eval mode (batch-norm statistics of a batch of masked
            # images would make a map depend on the others); the caller's modes come back on exit
            self.backbone.eval()
            if self.needs_gradients:
                stack.enter_context(torch.inference_mode(False))
                stack.enter_context(torch.enable_grad())
                images = images.clone()  # an inference tensor becomes a normal one
            else:
                stack.enter_context(torch.no_grad())
            maps = self.explain(images, targets)
        if maps.shape != (images.shape[0], *images.shape[-2:]):
            raise RuntimeError(f"{type(self).__name__} returned {tuple(maps.shape)} for images {tuple(images.shape)}")
        return maps.detach().float()

    @staticmethod
    def check_images(images: Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"images must be float [B, 3, H, W] in [0, 1], got {images.dtype} {tuple(images.shape)}")

    def check_targets(self, targets: Tensor | int | list, batch: int) -> Tensor:
        targets = torch.as_tensor(targets)
        if targets.dim() != 1 or targets.shape[0] != batch or targets.is_floating_point():
            raise ValueError(
                f"targets must be a LongTensor of {batch} class indices (one per image), got "
                f"{targets.dtype} {tuple(targets.shape)}"
            )
        bad = targets[(targets < 0) | (targets >= self.num_classes)]
        if bad.numel():
            raise ValueError(f"targets must be in [0, {self.num_classes}), got {bad.tolist()}")
        return targets.long()

    def explain(self, images: Tensor, targets: Tensor | None) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backbone={self.backbone.name!r})"


def to_maps(low_res: Tensor, size: Sequence[int]) -> Tensor:
    """Min-max each ``[B, h, w]`` map at its own resolution, then bilinear upsampling to ``size``."""
    return upsample(normalize(low_res), tuple(size))


def chunks(count: int, size: int) -> list[slice]:
    """Slices of at most ``size`` covering ``range(count)`` (perturbation methods batch their passes)."""
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    return [slice(start, min(start + size, count)) for start in range(0, count, size)]


BASELINES = ("mean", "black")


def perturbed_logits(backbone: Backbone, images: Tensor, masks: Tensor, baseline: str = "mean") -> Tensor:
    """Logits of ``images`` ([N, 3, H, W] in [0, 1]) multiplied by ``masks`` ([N, 1, H, W] in [0, 1]).

    ``baseline="mean"`` multiplies the *normalised* image, so removed pixels take the dataset's mean
    colour (what the Score-CAM, RISE and SISE reference codes do); ``"black"`` multiplies the [0, 1]
    image, so removed pixels are black (what TAME's training and AD/IC do).
    """
    if baseline == "mean":
        return backbone.model(backbone.normalize(images) * masks.to(images.dtype))
    if baseline == "black":
        return backbone(images * masks.to(images.dtype))
    raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")


class LayerExplainer(Explainer):
    """An explainer that reads one or more named layers (default: the backbone's CAM layer)."""

    def __init__(self, backbone: Backbone, layers: Sequence[str] | str | None = None) -> None:
        super().__init__(backbone)
        if layers is None:
            layers = [backbone.cam_layer]
        elif isinstance(layers, str):
            layers = [layers]
        self.layers = tuple(check_layers(backbone.model, list(layers), backbone.name))

    @property
    def layer(self) -> str:
        if len(self.layers) != 1:
            raise ValueError(f"{type(self).__name__} reads one layer, got {list(self.layers)}")
        return self.layers[0]

    def forward_layers(self, images: Tensor, grad_roots: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        return self.backbone.features(images, self.layers, grad_roots=grad_roots)

    @staticmethod
    def resolve_targets(logits: Tensor, targets: Tensor | None) -> Tensor:
        return logits.argmax(dim=1) if targets is None else targets

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backbone={self.backbone.name!r}, layers={list(self.layers)})"


class GradientCAM(LayerExplainer):
    """The Grad-CAM family: one forward pass, gradients of the target's logit down to the layer(s) only.

    Subclasses give ``layer_map(activations, gradients) -> [B, h, w]`` (float32, before normalisation);
    with several layers the per-layer maps are min-max normalised, upsampled and averaged.
    """

    needs_gradients = True

    def explain(self, images: Tensor, targets: Tensor | None) -> Tensor:
        activations, gradients = self.activations_and_gradients(images, targets)
        size = images.shape[-2:]
        maps = [to_maps(self.layer_map(activations[n], gradients[n]), size) for n in self.layers]
        return self.fuse(maps)

    def activations_and_gradients(
        self, images: Tensor, targets: Tensor | None
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Float32 activations and d(logit of the target)/d(activation) for each layer."""
        logits, captured = self.forward_layers(images, grad_roots=True)
        targets = self.resolve_targets(logits, targets)
        score = logits.float().gather(1, targets[:, None]).sum()  # images do not interact: per-image grads
        tensors = [captured[name] for name in self.layers]
        grads = torch.autograd.grad(score, tensors, allow_unused=True)
        activations = {name: t.detach().float() for name, t in zip(self.layers, tensors, strict=True)}
        gradients = {
            name: torch.zeros_like(activations[name]) if g is None else g.float()
            for name, g in zip(self.layers, grads, strict=True)
        }
        return activations, gradients

    def layer_map(self, activations: Tensor, gradients: Tensor) -> Tensor:
        weights = self.channel_weights(activations, gradients)
        return torch.relu((weights[:, :, None, None] * activations).sum(dim=1))

    def channel_weights(self, activations: Tensor, gradients: Tensor) -> Tensor:
        raise NotImplementedError

    def fuse(self, maps: list[Tensor]) -> Tensor:
        if len(maps) == 1:
            return maps[0]
        return normalize(torch.stack(maps).mean(dim=0))
