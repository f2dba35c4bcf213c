"""Ablation-CAM (Desai & Ramaswamy, WACV 2020): a channel's weight is the relative drop of the target's
logit when that channel is zeroed."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from tame_lit.backbones import Backbone
from tame_lit.explainers.base import EXPLAINERS, LayerExplainer, chunks, to_maps
from tame_lit.features import model_tail

__all__ = ["AblationCAM"]

# |y^c| below this is rounding noise for float32 logits; the map depends only on the sign of y^c, which is
# then meaningless, so the map is zeros
_TINY_LOGIT = 1e-6


@EXPLAINERS.register("ablationcam")
class AblationCAM(LayerExplainer):
    """w_k = (y^c - y^c_k) / y^c with y^c_k the logit when channel k is zeroed;  L = ReLU(sum_k w_k A^k).

    Ablating a channel changes nothing below the layer, so when the network after the layer can be cut
    out (``features.model_tail``) only that part is re-run, which is most of the speed; otherwise the full
    network runs with a hook swapping in the ablated activations. All-zero channels are not ablated
    (zeroing them changes nothing, and they add nothing to the map). The ablated (image, channel) pairs of
    the whole batch run ``batch_size`` at a time.
    """

    def __init__(self, backbone: Backbone, layers: Sequence[str] | str | None = None, batch_size: int = 64) -> None:
        super().__init__(backbone, layers)
        _ = self.layer  # one layer only: fail here rather than at the first call
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.batch_size = batch_size

    def explain(self, images: Tensor, targets: Tensor | None) -> Tensor:
        logits, captured = self.forward_layers(images)
        targets = self.resolve_targets(logits, targets)
        activations = captured[self.layer]
        if activations.dim() != 4:
            raise ValueError(f"layer {self.layer!r} must output [B, C, h, w] maps, got {tuple(activations.shape)}")
        score = logits.float().gather(1, targets[:, None]).squeeze(1)
        ablated = score[:, None].repeat(1, activations.shape[1])  # channels left as they are: w_k = 0
        pairs = activations.flatten(2).ne(0).any(dim=2).nonzero()
        if len(pairs):
            run = self.ablated_logits(images, activations, logits)
            for part in chunks(len(pairs), self.batch_size):
                row, channel = pairs[part].unbind(1)
                batch = activations[row]  # advanced indexing: a copy
                batch[torch.arange(len(row), device=batch.device), channel] = 0
                ablated[row, channel] = run(row, batch).float().gather(1, targets[row][:, None]).squeeze(1)
        usable = score.abs() > _TINY_LOGIT
        weights = (score[:, None] - ablated) / torch.where(usable, score, 1.0)[:, None] * usable[:, None]
        low_res = torch.relu((weights[:, :, None, None] * activations.float()).sum(dim=1))
        return to_maps(low_res, images.shape[-2:])

    def ablated_logits(self, images: Tensor, activations: Tensor, logits: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
        """``run(rows, ablated) -> logits`` of images ``rows`` with the layer's output replaced by ``ablated``.

        The tail is checked once against the logits already computed, so a model that fx traced into
        something else (state read at trace time) falls back to the full pass rather than giving wrong maps.
        """
        # a tail takes the layer's own output, rebuilt from the map by the layout (tame_lit.layouts): as is for CNNs,
        # permuted for channels-last stages (Swin). A token layer's output also holds the prefix tokens, which the map
        # lacks, so token networks take the full pass, which rebuilds the layer's output from the ablated map.
        layout, module = self.backbone.layout, self.backbone.layer(self.layer)
        tail = model_tail(self.backbone.model, self.layer) if layout.kind != "tokens" else None
        if tail is not None:
            expected = logits.float()
            scale = 1e-3 * max(1.0, expected.abs().max().item())
            rebuilt = layout.from_map(activations, None, module)
            if torch.allclose(tail(rebuilt).float(), expected, rtol=1e-3, atol=scale):
                return lambda rows, ablated: tail(layout.from_map(ablated, None, module))
        return lambda rows, ablated: self.full_pass(module, images[rows], ablated)

    def full_pass(self, module: nn.Module, images: Tensor, replacement: Tensor) -> Tensor:
        """The whole network, with ``module``'s output replaced by ``replacement`` (the hook never stays)."""
        layout = self.backbone.layout
        handle = module.register_forward_hook(
            lambda module, inputs, output: layout.from_map(replacement, output, module)
        )
        try:
            return self.backbone(images)
        finally:
            handle.remove()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(backbone={self.backbone.name!r}, layers={list(self.layers)}, "
            f"batch_size={self.batch_size})"
        )
