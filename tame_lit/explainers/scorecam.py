"""Score-CAM (Wang et al., CVPR-W 2020): each channel is weighted by the class probability of the image
masked by that channel, as the official code does (softmax probability, no baseline score subtracted)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from tame_lit.backbones import Backbone
from tame_lit.explainers.base import BASELINES, EXPLAINERS, LayerExplainer, chunks, perturbed_logits, to_maps
from tame_lit.maps import normalize, upsample

__all__ = ["ScoreCAM"]


@EXPLAINERS.register("scorecam")
class ScoreCAM(LayerExplainer):
    """H_k = norm01(Up(A^k));  s_k = softmax(f(I * H_k))_c;  L = ReLU(sum_k s_k A^k).

    One masked forward pass per channel is the whole cost, so passes that cannot change the map are not run:
    an all-zero channel adds nothing whatever its score, and every constant channel has the all-zero mask,
    whose score (the fully masked image's) is computed once per image. The remaining (image, channel) pairs of
    the whole batch go through the network ``batch_size`` at a time. ``baseline`` is what removed pixels
    become (see ``perturbed_logits``): ``"mean"`` as in the reference code, or ``"black"``.
    """

    def __init__(
        self,
        backbone: Backbone,
        layers: Sequence[str] | str | None = None,
        batch_size: int = 64,
        baseline: str = "mean",
    ) -> None:
        super().__init__(backbone, layers)
        _ = self.layer  # one layer only: fail here rather than at the first call
        if baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.batch_size = batch_size
        self.baseline = baseline

    def explain(self, images: Tensor, targets: Tensor | None) -> Tensor:
        logits, captured = self.forward_layers(images)
        targets = self.resolve_targets(logits, targets)
        activations = captured[self.layer].float()
        if activations.dim() != 4:
            raise ValueError(f"layer {self.layer!r} must output [B, C, h, w] maps, got {tuple(activations.shape)}")
        flat = activations.flatten(2)
        # decided at the layer's resolution, where it is exact (upsampling may add rounding noise)
        constant = flat.amax(dim=2) == flat.amin(dim=2)
        blank = constant & flat[:, :, 0].ne(0)
        pairs = (~constant).nonzero()  # [P, 2] (image, channel) that need their own pass
        blank_images = blank.any(dim=1).nonzero().squeeze(1)  # one fully masked pass for each
        rows = torch.cat([pairs[:, 0], blank_images])
        channels = torch.cat([pairs[:, 1], blank_images.new_full(blank_images.shape, -1)])  # -1: all-zero mask
        scores = self.masked_scores(images, activations, targets, rows, channels)
        weights = torch.zeros_like(flat[:, :, 0])
        weights[pairs[:, 0], pairs[:, 1]] = scores[: len(pairs)]
        blank_score = torch.zeros_like(weights[:, 0])
        blank_score[blank_images] = scores[len(pairs) :]
        weights = torch.where(blank, blank_score[:, None], weights)
        low_res = torch.relu((weights[:, :, None, None] * activations).sum(dim=1))
        return to_maps(low_res, images.shape[-2:])

    def masked_scores(
        self, images: Tensor, activations: Tensor, targets: Tensor, rows: Tensor, channels: Tensor
    ) -> Tensor:
        """Target probability of image ``rows[i]`` masked by its channel ``channels[i]`` (-1: fully masked)."""
        scores = torch.empty(len(rows), device=images.device)
        for part in chunks(len(rows), self.batch_size):
            row, channel = rows[part], channels[part]
            masks = normalize(upsample(activations[row, channel.clamp_min(0)], images.shape[-2:]))
            masks = masks * (channel >= 0)[:, None, None]
            logits = perturbed_logits(self.backbone, images[row], masks[:, None], self.baseline)
            scores[part] = logits.float().softmax(dim=1).gather(1, targets[row][:, None]).squeeze(1)
        return scores

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(backbone={self.backbone.name!r}, layers={list(self.layers)}, "
            f"batch_size={self.batch_size}, baseline={self.baseline!r})"
        )
