"""RISE (Petsiuk et al., BMVC 2018): saliency as the confidence-weighted average of random masks (spec §E)."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from tame_lit.backbones import Backbone
from tame_lit.explainers.base import BASELINES, EXPLAINERS, BackboneExplainer, chunks, perturbed_logits
from tame_lit.maps import normalize

__all__ = ["RISE"]


@EXPLAINERS.register("rise")
class RISE(BackboneExplainer):
    """S = 1/(N p) sum_i p^c(I masked by M_i) M_i over N random masks, min-max normalised per image.

    The masks follow the official code (eclique/RISE): N binary ``cell_size`` x ``cell_size`` grids
    (``cell_size`` is the number of cells per side, the paper's s) with P(1) = ``probability``, each
    upsampled bilinearly (skimage ``resize(order=1, mode="reflect")``: mirror edges) to (s + 1) * ceil(H / s)
    pixels and cropped to H x W at a random shift in [0, ceil(H / s)). Grids and shifts come from a CPU
    ``torch.Generator`` seeded with ``seed``, so every image of every batch, on any device, sees the same
    masks. Masks are rendered chunk by chunk on the images' device; each forward pass holds at most
    ``batch_size`` masked images (image-mask pairs of the whole batch). ``p^c`` is the softmax probability
    of the target; ``baseline`` is how removed pixels look (see ``perturbed_logits``).

    ``center_scores`` (default, tame-lit's variance reduction): S uses p^c - mean_i(p^c) instead of p^c.
    In expectation the two differ by a constant (every pixel is kept with the same probability p), which the
    min-max removes; but the official estimator also carries mean(p^c) times the random unevenness of the
    masks' coverage, a pattern fixed by the seed and independent of the model, which at a few thousand
    masks can outweigh the signal when masking barely changes the confidence. ``center_scores=False``
    gives the official estimator.
    """

    def __init__(
        self,
        backbone: Backbone,
        num_masks: int = 4000,
        cell_size: int = 7,
        probability: float = 0.5,
        seed: int = 0,
        batch_size: int = 64,
        baseline: str = "mean",
        center_scores: bool = True,
    ) -> None:
        super().__init__(backbone)
        self.center_scores = bool(center_scores)
        self.num_masks = _positive_int("num_masks", num_masks)
        self.cell_size = _positive_int("cell_size", cell_size)
        self.batch_size = _positive_int("batch_size", batch_size)
        if isinstance(seed, bool) or int(seed) != seed:
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.seed = int(seed)
        probability = float(probability)
        if not 0.0 < probability <= 1.0:
            raise ValueError(f"probability (of a grid cell being kept) must be in (0, 1], got {probability}")
        self.probability = probability
        if baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
        self.baseline = baseline

    def draw(self, height: int, width: int) -> tuple[Tensor, Tensor]:
        """The seeded random part of the masks for H x W images, on the CPU: float grids ``[N, s, s]`` of
        0/1 and integer shifts ``[N, 2]`` (rows, columns), each in [0, ceil(size / s))."""
        generator = torch.Generator().manual_seed(self.seed)
        s = self.cell_size
        grids = (torch.rand(self.num_masks, s, s, generator=generator) < self.probability).float()
        shifts = torch.stack(
            [torch.randint(0, math.ceil(size / s), (self.num_masks,), generator=generator) for size in (height, width)],
            dim=1,
        )
        return grids, shifts

    def render(self, grids: Tensor, shifts: Tensor, height: int, width: int) -> Tensor:
        """Float32 masks ``[n, H, W]`` in [0, 1]: grids upsampled and cropped at their shifts.

        Separable bilinear interpolation by gathers (no matmul, so autocast cannot lower its precision).
        """
        s = grids.shape[-1]
        grids = grids.float()
        top, bottom, weight_y = _axis(height, s, shifts[:, 0])  # [n, H]
        left, right, weight_x = _axis(width, s, shifts[:, 1])  # [n, W]
        rows = grids.gather(1, top[:, :, None].expand(-1, -1, s)) * (1 - weight_y)[:, :, None]
        rows = rows + grids.gather(1, bottom[:, :, None].expand(-1, -1, s)) * weight_y[:, :, None]  # [n, H, s]
        masks = rows.gather(2, left[:, None, :].expand(-1, height, -1)) * (1 - weight_x)[:, None, :]
        return masks + rows.gather(2, right[:, None, :].expand(-1, height, -1)) * weight_x[:, None, :]

    def masks(self, height: int, width: int, device: torch.device | str | None = None) -> Tensor:
        """All N masks ``[N, H, W]`` (what ``explain`` uses for H x W images; for inspection and tests)."""
        grids, shifts = self.draw(height, width)
        return self.render(grids.to(device), shifts.to(device), height, width)

    def saliency(self, images: Tensor, targets: Tensor | None) -> Tensor:
        """The unnormalised RISE saliency ``[B, H, W]`` (float32) of each image for its target."""
        batch, (height, width) = images.shape[0], images.shape[-2:]
        device = images.device
        if targets is None:
            targets = self.backbone(images).argmax(dim=1)
        grids, shifts = (t.to(device) for t in self.draw(height, width))
        # float64 sums: centring subtracts two nearly equal totals
        total = torch.zeros(batch, height * width, device=device, dtype=torch.float64)
        coverage = torch.zeros_like(total)  # the sum of the masks each image saw
        score_sum = torch.zeros(batch, device=device, dtype=torch.float64)
        # pairs in mask-major order (pair q: mask q // B, image q % B), so a chunk renders few masks
        for part in chunks(batch * self.num_masks, self.batch_size):
            pairs = torch.arange(part.start, part.stop, device=device)
            image_index = pairs % batch
            first, last = part.start // batch, (part.stop - 1) // batch + 1
            local = pairs // batch - first
            masks = self.render(grids[first:last], shifts[first:last], height, width)
            logits = perturbed_logits(self.backbone, images[image_index], masks[local, None], self.baseline)
            scores = logits.float().softmax(dim=1).gather(1, targets[image_index, None]).squeeze(1)
            weights = torch.zeros(batch, last - first, device=device, dtype=torch.float64)
            weights[image_index, local] = scores.double()
            flat = masks.flatten(1).double()  # float64 matmuls are never lowered by autocast
            total += weights @ flat
            if self.center_scores:
                seen = torch.zeros_like(weights)
                seen[image_index, local] = 1.0
                coverage += seen @ flat
                score_sum.index_add_(0, image_index, scores.double())
        if self.center_scores:
            total -= score_sum[:, None] / self.num_masks * coverage
        return (total.view(batch, height, width) / (self.num_masks * self.probability)).float()

    def explain(self, images: Tensor, targets: Tensor | None) -> Tensor:
        return normalize(self.saliency(images, targets))

    def __repr__(self) -> str:
        return (
            f"RISE(backbone={self.backbone.name!r}, num_masks={self.num_masks}, cell_size={self.cell_size}, "
            f"probability={self.probability}, seed={self.seed}, baseline={self.baseline!r}, "
            f"center_scores={self.center_scores})"
        )


def _axis(length: int, cells: int, shifts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For a crop of ``length`` pixels at ``shifts`` ([n]) of a ``cells``-wide grid upsampled to
    (cells + 1) * ceil(length / cells): the two grid indices and the weight of the second, per pixel.

    Pixel-centre alignment (``align_corners=False``) with mirror edges, as skimage's ``mode="reflect"``.
    """
    upsampled = (cells + 1) * math.ceil(length / cells)
    position = shifts[:, None] + torch.arange(length, device=shifts.device)  # [n, length]
    source = (position.float() + 0.5) * (cells / upsampled) - 0.5
    source = source.abs()  # mirror about the first cell's centre
    source = torch.where(source > cells - 1, 2 * (cells - 1) - source, source).clamp(0, cells - 1)
    low = source.floor().long().clamp(max=cells - 1)
    return low, (low + 1).clamp(max=cells - 1), source - low


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)
