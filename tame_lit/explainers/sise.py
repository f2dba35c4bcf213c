"""SISE (Sattarzadeh et al., AAAI 2021): input sampling with attribution-selected feature maps of every
block, fused shallow to deep (spec methods.md §C)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from tame_lit.backbones import Backbone
from tame_lit.explainers.base import BASELINES, EXPLAINERS, LayerExplainer, chunks, perturbed_logits
from tame_lit.features import capture, preserved_state, stage_outputs
from tame_lit.maps import normalize, upsample

__all__ = ["FUSIONS", "SISE", "otsu_threshold"]

FUSIONS = ("otsu", "simple")


def otsu_threshold(maps: Tensor, bins: int = 256) -> Tensor:
    """Otsu's threshold of each map ``[B, ...]`` (finite values), as ``skimage.filters.threshold_otsu``.

    A ``bins``-bin histogram over each map's own [min, max]; the threshold is the centre of the bin that
    maximises the between-class variance (first one on ties), and ``map > threshold`` is the foreground.
    A constant map gets its value (so nothing is foreground). Returns float32 ``[B]``.
    """
    flat = maps.detach().float().flatten(1)
    batch = flat.shape[0]
    low = flat.amin(dim=1, keepdim=True)
    span = flat.amax(dim=1, keepdim=True) - low
    index = ((flat - low) / span.clamp_min(torch.finfo(torch.float32).tiny) * bins).long().clamp_(0, bins - 1)
    index = index + torch.arange(batch, device=flat.device)[:, None] * bins
    counts = torch.bincount(index.flatten(), minlength=batch * bins).view(batch, bins).float()
    centres = low + (torch.arange(bins, device=flat.device) + 0.5) * (span / bins)
    mass = counts * centres
    weight_low, weight_high = counts.cumsum(dim=1), counts.flip(1).cumsum(dim=1).flip(1)
    mean_low = mass.cumsum(dim=1) / weight_low.clamp_min(1)
    mean_high = mass.flip(1).cumsum(dim=1).flip(1) / weight_high.clamp_min(1)
    variance = weight_low[:, :-1] * weight_high[:, 1:] * (mean_low[:, :-1] - mean_high[:, 1:]) ** 2
    threshold = centres.gather(1, variance.argmax(dim=1, keepdim=True)).squeeze(1)
    return torch.where(span.squeeze(1) > 0, threshold, low.squeeze(1))


@EXPLAINERS.register("sise")
class SISE(LayerExplainer):
    """Semantic Input Sampling for Explanation, all four phases, per image.

    1. Layers: the last layer before each down-sampling plus the last conv output (``stage_outputs(...,
       conv_only=True)``, found once here), or an explicit list (sorted into forward order).
    2. One forward and one backward of the target's softmax confidence, down to the shallowest layer
       only; per layer, alpha_k = spatial sum of the gradients, and channel k is kept iff
       alpha_k > ``mu`` * max_k alpha_k (``mu = 0``: the positive-gradient channels). Each kept map,
       upsampled bilinearly and min-max normalised, is a mask (constant maps, which give zero masks and
       add nothing, are skipped).
    3. Per layer, V = sum_m s_m m / sum(m) with s_m the softmax confidence of the target on the image
       masked by m (``baseline``: see ``perturbed_logits``), then min-max. Forward passes hold at most
       ``batch_size`` (image, mask) pairs, taken across the whole batch and all layers.
    4. Cascade fusion, shallow to deep: E = V_1, then E = (E + V_l) * B(V_l), where B is the hard Otsu
       binarisation of the deeper map (``fusion="otsu"``, the paper) or the map itself (``"simple"``);
       final min-max. (The course code's soft Otsu variant is not implemented.) Hard gating is
       discontinuous: float noise can move a threshold by one bin and flip the pixels at that level.
    """

    needs_gradients = True
    layouts = ("spatial",)

    def __init__(
        self,
        backbone: Backbone,
        layers: Sequence[str] | str | None = None,
        mu: float = 0.0,
        fusion: str = "otsu",
        batch_size: int = 64,
        baseline: str = "mean",
    ) -> None:
        if backbone.layout.kind not in self.layouts:
            raise ValueError(
                f"sise is not defined for {backbone.name}: its layers are a CNN's stage outputs, fused from one "
                f"resolution to the next; this network's layers are {backbone.layout.kind} "
                "(tame_lit.layouts). Use gradcam, scorecam, rise or a trained head"
            )
        explicit = layers is not None
        if layers is None:
            example = torch.zeros(1, 3, *backbone.input_size, device=backbone.mean.device)
            layers = stage_outputs(backbone.model, example, conv_only=True)
        super().__init__(backbone, layers)
        if explicit and len(self.layers) > 1:
            self.layers = self._forward_order(self.layers)
        mu = float(mu)
        if not math.isfinite(mu) or mu < 0:
            raise ValueError(f"mu (gradient threshold, fraction of the largest channel weight) must be >= 0, got {mu}")
        self.mu = mu
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        self.fusion = fusion
        if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.batch_size = int(batch_size)
        if baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
        self.baseline = baseline

    def _forward_order(self, layers: Sequence[str]) -> tuple[str, ...]:
        """``layers`` in the order they run (the cascade goes shallow to deep), from one dry run."""
        example = torch.zeros(1, 3, *self.backbone.input_size, device=self.backbone.mean.device)
        with preserved_state(self.backbone), torch.no_grad(), capture(self.backbone.model, layers) as store:
            self.backbone.eval()
            self.backbone(example)
        missing = [name for name in layers if name not in store]
        if missing:
            raise ValueError(f"layer(s) {missing} of {self.backbone.name} did not run during a forward pass")
        not_maps = {name: tuple(store[name].shape) for name in store if store[name].dim() != 4}
        if not_maps:
            raise ValueError(f"SISE layers must output [B, C, H, W] feature maps; got {not_maps}")
        return tuple(store)

    def explain(self, images: Tensor, targets: Tensor | None) -> Tensor:
        images = images.detach()
        targets, selected = self.select(images, targets)
        return self.fuse(self.layer_maps(images, targets, selected))

    def select(self, images: Tensor, targets: Tensor | None) -> tuple[Tensor, dict[str, tuple[Tensor, Tensor]]]:
        """Phase 2: the targets and, per layer, float32 activations ``[B, K, h, w]`` with the kept channels
        ``[B, K]`` (bool). Needs grad mode (``__call__`` provides it)."""
        logits, captured = self.backbone.features(images, self.layers, grad_roots=True)
        targets = self.resolve_targets(logits, targets)
        confidence = logits.float().softmax(dim=1).gather(1, targets[:, None]).sum()  # images do not interact
        tensors = [captured[name] for name in self.layers]
        if confidence.requires_grad:
            grads = torch.autograd.grad(confidence, tensors, allow_unused=True)
        else:  # no selected layer feeds the logits
            grads = (None,) * len(tensors)
        selected = {}
        for name, activation, grad in zip(self.layers, tensors, grads, strict=True):
            activation = activation.detach().float()
            if activation.dim() != 4:
                raise ValueError(f"SISE layer {name!r} must output [B, C, H, W], got {tuple(activation.shape)}")
            alpha = activation.new_zeros(activation.shape[:2]) if grad is None else grad.float().sum(dim=(2, 3))
            selected[name] = (activation, alpha > self.mu * alpha.amax(dim=1, keepdim=True))
        return targets, selected

    def layer_maps(self, images: Tensor, targets: Tensor, selected: dict[str, tuple[Tensor, Tensor]]) -> list[Tensor]:
        """Phase 3: the min-max normalised visualisation map ``[B, H, W]`` of each layer, shallow to deep."""
        batch, size = images.shape[0], tuple(images.shape[-2:])
        device = images.device
        activations, pieces, offsets = [], [], [0]
        for index, name in enumerate(self.layers):
            activation, keep = selected[name]
            flat = activation.flatten(2)
            keep = keep & (flat.amax(dim=2) - flat.amin(dim=2) > 1e-12)  # a constant map is a zero mask
            pairs = keep.nonzero()  # (image, channel), image-major
            pieces.append(torch.cat([torch.full_like(pairs[:, :1], index), pairs], dim=1))
            activations.append(activation)
            offsets.append(offsets[-1] + pairs.shape[0])
        entries = torch.cat(pieces)  # (layer, image, channel) for every mask of the batch
        sums = torch.zeros(len(self.layers) * batch, size[0] * size[1], device=device)
        with torch.no_grad():
            for part in chunks(offsets[-1], self.batch_size):
                masks = []
                for index, activation in enumerate(activations):  # the layers this chunk overlaps
                    start, stop = max(part.start, offsets[index]), min(part.stop, offsets[index + 1])
                    if start < stop:
                        _, image, channel = entries[start:stop].unbind(1)
                        masks.append(normalize(upsample(activation[image, channel], size)))
                masks = torch.cat(masks)
                layer, image, _ = entries[part].unbind(1)
                logits = perturbed_logits(self.backbone, images[image], masks[:, None], self.baseline)
                scores = logits.float().softmax(dim=1).gather(1, targets[image, None])
                flat = masks.flatten(1)
                contributions = scores * flat / flat.sum(dim=1, keepdim=True).clamp_min(1e-12)
                sums.index_add_(0, layer * batch + image, contributions)
        return list(normalize(sums.view(len(self.layers), batch, *size).flatten(0, 1)).view(-1, batch, *size))

    def fuse(self, maps: Sequence[Tensor]) -> Tensor:
        """Phase 4: cascade fusion of per-layer maps ``[B, H, W]`` (shallow to deep), then min-max."""
        fused = maps[0].float()
        for deeper in maps[1:]:
            fused = (fused + deeper) * self.gate(deeper.float())
        return normalize(fused)

    def gate(self, deeper: Tensor) -> Tensor:
        """B(V): where the deeper map lets the fused map through."""
        if self.fusion == "simple":
            return deeper
        return (deeper > otsu_threshold(deeper)[:, None, None]).float()

    def __repr__(self) -> str:
        return (
            f"SISE(backbone={self.backbone.name!r}, layers={list(self.layers)}, mu={self.mu}, "
            f"fusion={self.fusion!r}, baseline={self.baseline!r})"
        )
