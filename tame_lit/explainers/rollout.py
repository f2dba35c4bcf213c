"""Attention rollout (Abnar & Zuidema, ACL 2020): the classic transformer baseline, how much each patch token
reaches the classifier's token through the attention of every block, residual connections included."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from tame_lit.backbones import Backbone
from tame_lit.explainers.base import EXPLAINERS, BackboneExplainer, to_maps

__all__ = ["AttentionRollout", "attention_modules"]

HEAD_FUSIONS = ("mean", "max", "min")


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules whose weights can be read, in the order they run: timm's ``Attention`` (ViT,
    DeiT and their relatives), recognised by its ``fused_attn`` switch and the ``attn_drop`` it applies to the
    weights, and ``nn.MultiheadAttention`` (torchvision's ``vit_*``)."""
    return [
        module
        for module in model.modules()
        if isinstance(module, nn.MultiheadAttention)
        or (
            isinstance(getattr(module, "fused_attn", None), bool)
            and isinstance(getattr(module, "attn_drop", None), nn.Module)
        )
    ]


@contextlib.contextmanager
def recorded_attention(modules: list[nn.Module]) -> Iterator[list[Tensor]]:
    """Record each module's attention weights ``[B, heads, N, N]`` during the passes inside the block.

    Fused kernels (``scaled_dot_product_attention``, ``nn.MultiheadAttention``'s fast path) never form the
    weights, so each module runs its explicit path while recording: timm's with ``fused_attn=False``,
    ``nn.MultiheadAttention`` called with ``need_weights=True, average_attn_weights=False`` (its callers ask for
    no weights). The switches, and with them the fused kernels of normal use, come back on exit, as do the hooks
    (also through an exception)."""
    weights: list[Tensor] = []
    switches = [(module, module.fused_attn) for module in modules if not isinstance(module, nn.MultiheadAttention)]
    handles = []

    def ask_for_weights(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, {**kwargs, "need_weights": True, "average_attn_weights": False}

    def keep_weights(_module: nn.Module, _args: tuple, output: tuple[Tensor, Tensor]) -> None:
        weights.append(output[1])

    try:
        for module in modules:
            if isinstance(module, nn.MultiheadAttention):
                handles.append(module.register_forward_pre_hook(ask_for_weights, with_kwargs=True))
                handles.append(module.register_forward_hook(keep_weights))
            else:
                module.fused_attn = False
                handles.append(module.attn_drop.register_forward_hook(lambda _m, inputs, _o: weights.append(inputs[0])))
        yield weights
    finally:
        for handle in handles:
            handle.remove()
        for module, switch in switches:
            module.fused_attn = switch


@EXPLAINERS.register("attention_rollout")
class AttentionRollout(BackboneExplainer):
    """R = prod over blocks l (last first) of normalize_rows(0.5 * A_l + 0.5 * I), A_l the block's attention
    weights fused over heads (``head_fusion``: mean, the paper's; max or min, as jacobgil/vit-explain offers),
    optionally with the lowest ``discard_ratio`` of each fused matrix set to 0 (never a token's attention to
    itself). The map is the row of the first prefix token (the class token) over the patch tokens; a model
    without prefix tokens, which averages them, gets the mean row of the patch tokens. Class-agnostic: the
    target does not change the map (the method has no notion of a class).

    Defined for transformers whose attention weights can be read (timm ViT/DeiT, torchvision ``vit_*``:
    ``attention_modules``); refused elsewhere, saying why.
    """

    layouts = ("tokens",)

    def __init__(self, backbone: Backbone, head_fusion: str = "mean", discard_ratio: float = 0.0) -> None:
        super().__init__(backbone)
        if backbone.layout.kind not in self.layouts:
            raise ValueError(
                f"attention_rollout is not defined for {backbone.name}: it follows a transformer's attention "
                f"between tokens, and this network's layers are {backbone.layout.kind} (tame_lit.layouts); use "
                "gradcam or a trained head"
            )
        self.attention_layers = attention_modules(backbone.model)
        if not self.attention_layers:
            raise ValueError(
                f"attention_rollout found no attention module whose weights it can read in {backbone.name} (timm's "
                "ViT/DeiT Attention or nn.MultiheadAttention)"
            )
        if head_fusion not in HEAD_FUSIONS:
            raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")
        if not 0.0 <= float(discard_ratio) < 1.0:
            raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio!r}")
        self.head_fusion = head_fusion
        self.discard_ratio = float(discard_ratio)

    def explain(self, images: Tensor, targets: Tensor | None) -> Tensor:
        with recorded_attention(self.attention_layers) as weights:
            self.backbone(images)
        if len(weights) != len(self.attention_layers):
            raise RuntimeError(
                f"attention_rollout recorded {len(weights)} attention maps for {len(self.attention_layers)} blocks"
            )
        rollout = None
        for attention in weights:
            fused = getattr(attention.float(), self.head_fusion)(dim=1)
            fused = fused if self.head_fusion == "mean" else fused.values
            if self.discard_ratio > 0:
                fused = self._discard_lowest(fused)
            identity = torch.eye(fused.shape[-1], device=fused.device)
            step = 0.5 * fused + 0.5 * identity
            step = step / step.sum(dim=-1, keepdim=True)
            rollout = step if rollout is None else step @ rollout
        prefix = self.backbone.layout.prefix_tokens
        reach = rollout[:, 0, prefix:] if prefix else rollout[:, prefix:, prefix:].mean(dim=1)
        height, width = (int(s) // p for s, p in zip(images.shape[-2:], self.backbone.layout.patch_size, strict=True))
        return to_maps(reach.reshape(-1, height, width), images.shape[-2:])

    def _discard_lowest(self, fused: Tensor) -> Tensor:
        """Zero the lowest ``discard_ratio`` of each image's fused weights, keeping every token's self-attention."""
        flat = fused.flatten(1)
        count = int(flat.shape[1] * self.discard_ratio)
        lowest = flat.topk(count, dim=1, largest=False).indices
        keep = torch.ones_like(flat, dtype=torch.bool).scatter_(1, lowest, False)
        keep = keep.view_as(fused) | torch.eye(fused.shape[-1], dtype=torch.bool, device=fused.device)
        return fused * keep

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(backbone={self.backbone_name!r}, head_fusion={self.head_fusion!r}, "
            f"discard_ratio={self.discard_ratio})"
        )
