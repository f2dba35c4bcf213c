"""Feature layouts: how a captured layer's output becomes a ``[B, C, h, w]`` map, declared once per architecture
family, so that heads, explainers and metrics see CNN maps whatever the network.

- ``spatial`` (CNNs): the output is ``[B, C, h, w]`` already.
- ``tokens`` (ViT, DeiT and other timm ``VisionTransformer``\\ s, torchvision's ``vit_*``): ``[B, prefix + h*w, C]``;
  the ``prefix`` tokens (class, distillation, register) are dropped using the model's own count, and the grid is
  the input size over the patch size, so other input sizes work.
- ``channels_last`` (Swin and other ``[B, h, w, C]`` stages): permuted to ``[B, C, h, w]``.

In ``tokens`` and ``channels_last`` networks a convolution (the patch embedding) still returns ``[B, C, h, w]``.
``FeatureLayout.to_map`` gives the map; ``FeatureLayout.from_map`` rebuilds the layer's output from it (the prefix
tokens untouched), so that a network run on the rebuilt output depends on the map and gradients with respect to the
map are exact (what the Grad-CAM family differentiates).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["LAYOUTS", "FeatureLayout", "layout_of", "pair"]

LAYOUTS = ("spatial", "tokens", "channels_last")


@dataclass(frozen=True)
class FeatureLayout:
    """``kind``: one of ``LAYOUTS``. ``prefix_tokens``: tokens before the patch tokens (``tokens``).
    ``patch_size``: input pixels per token, (height, width) (``tokens``)."""

    kind: str = "spatial"
    prefix_tokens: int = 0
    patch_size: tuple[int, int] = (1, 1)

    def __post_init__(self) -> None:
        if self.kind not in LAYOUTS:
            raise ValueError(f"feature layout must be one of {list(LAYOUTS)}, got {self.kind!r}")

    def to_map(self, output: Tensor, module: nn.Module, image_size: Sequence[int], layer: str) -> Tensor:
        """``output`` of ``module`` (the layer named ``layer``) as ``[B, C, h, w]``; ``image_size``: the input's
        (H, W). Fails with the layer's name and shape when the output has no such reading."""
        if self.kind == "spatial" or isinstance(module, nn.Conv2d):
            if output.dim() != 4:
                raise ValueError(self._problem(layer, output, "[B, C, h, w]"))
            return output
        if self.kind == "channels_last":
            if output.dim() != 4:
                raise ValueError(self._problem(layer, output, "[B, h, w, C]"))
            return output.permute(0, 3, 1, 2)
        height, width = (int(size) // patch for size, patch in zip(image_size, self.patch_size, strict=True))
        if output.dim() != 3 or output.shape[1] != self.prefix_tokens + height * width:
            expected = f"[B, {self.prefix_tokens} + {height}x{width} tokens, C]"
            raise ValueError(self._problem(layer, output, expected))
        patches = output[:, self.prefix_tokens :]
        return patches.transpose(1, 2).reshape(output.shape[0], output.shape[2], height, width)

    def from_map(self, feature_map: Tensor, output: Tensor | None, module: nn.Module) -> Tensor:
        """The layer's output rebuilt from ``feature_map`` (``to_map`` of ``output``), in ``output``'s layout.
        ``output`` (the layer's own) is read only for its prefix tokens (``tokens``); elsewhere it may be None."""
        if self.kind == "spatial" or isinstance(module, nn.Conv2d):
            return feature_map
        if self.kind == "channels_last":
            return feature_map.permute(0, 2, 3, 1)
        if output is None:
            raise ValueError("rebuilding a token layer's output needs that output (its prefix tokens)")
        patches = feature_map.flatten(2).transpose(1, 2)
        return torch.cat([output[:, : self.prefix_tokens], patches], dim=1)

    def _problem(self, layer: str, output: Tensor, expected: str) -> str:
        tokens = f", {self.prefix_tokens} prefix tokens, {self.patch_size} pixels per token"
        return (
            f"layer {layer!r} returns shape {tuple(output.shape)}, not {expected} ({self.kind} layout"
            f"{tokens if self.kind == 'tokens' else ''}); capture a block's output (a feature map or a sequence "
            "of patch tokens)"
        )


def layout_of(model: nn.Module) -> FeatureLayout:
    """The layout of ``model``'s family, read from the model itself: timm ``VisionTransformer`` (and its
    subclasses: DeiT distilled, register tokens) -> ``tokens`` with ``num_prefix_tokens`` and the patch
    embedding's patch size; torchvision ``VisionTransformer`` -> ``tokens`` with its class token and
    ``patch_size``; timm ``SwinTransformer`` (and any model whose ``output_fmt`` is ``NHWC``) ->
    ``channels_last``; anything else -> ``spatial``."""
    patch_embed = getattr(model, "patch_embed", None)
    if hasattr(model, "num_prefix_tokens") and patch_embed is not None and hasattr(patch_embed, "patch_size"):
        height, width = pair(patch_embed.patch_size)
        return FeatureLayout("tokens", int(model.num_prefix_tokens), (height, width))
    if type(model).__name__ == "VisionTransformer" and hasattr(model, "class_token") and hasattr(model, "conv_proj"):
        return FeatureLayout("tokens", 1, pair(model.patch_size))  # torchvision
    if str(getattr(model, "output_fmt", "")).upper().endswith("NHWC"):
        return FeatureLayout("channels_last")
    return FeatureLayout()


def pair(size: int | Sequence[int], name: str = "size") -> tuple[int, int]:
    """``(height, width)`` from one int or two (an input size, a patch size); ``name`` names it in the error."""
    if isinstance(size, int):
        return (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2:
        raise ValueError(f"{name} must be an int or (height, width), got {size}")
    return size
