"""Operations on explanation maps ``[B, h, w]`` shared by heads, explainers and metrics."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["keep_top", "normalize", "smooth", "top_count", "top_set", "upsample"]


def normalize(maps: Tensor, eps: float = 1e-12) -> Tensor:
    """Min-max each map to [0, 1] in float32; a constant (or non-finite) map becomes zeros, never NaN."""
    maps = torch.nan_to_num(maps.float(), nan=0.0, posinf=0.0, neginf=0.0)
    flat = maps.flatten(1)
    low = flat.amin(dim=1, keepdim=True)
    span = flat.amax(dim=1, keepdim=True) - low
    scaled = torch.where(span > eps, (flat - low) / span.clamp_min(eps), torch.zeros_like(flat))
    return scaled.view_as(maps)


def upsample(maps: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Bilinear (align_corners=False) resize of ``[B, h, w]`` maps to ``size``, in float32."""
    maps = maps.float()
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps.unsqueeze(1), size=tuple(size), mode="bilinear", align_corners=False).squeeze(1)


def smooth(maps: Tensor, sigma: tuple[float, float]) -> Tensor:
    """Gaussian blur of ``[B, H, W]`` maps with standard deviations ``sigma = (along H, along W)`` in pixels, in
    float32: the kernel and reflected borders of torchvision's ``gaussian_blur`` (2 * ceil(3 sigma) + 1 taps),
    one axis at a time, so the cost grows with sigma, not its square. The kernels are constants of the graph,
    which torchvision's are not, so ONNX exports it. A sigma of 0 leaves that axis as it is."""
    maps = maps.float().unsqueeze(1)
    for axis, deviation in enumerate(sigma):
        if deviation < 0:
            raise ValueError(f"smoothing sigma must be >= 0 pixels, got {tuple(sigma)}")
        length = maps.shape[2 + axis]
        half = min(math.ceil(3 * deviation), length - 1)  # reflect padding needs pad < length
        if deviation == 0 or half < 1:
            continue
        offsets = torch.arange(-half, half + 1, dtype=torch.float32, device=maps.device)
        kernel = torch.exp(-0.5 * (offsets / deviation) ** 2)
        shape, padding = ((1, 1, -1, 1), (0, 0, half, half)) if axis == 0 else ((1, 1, 1, -1), (half, half, 0, 0))
        maps = F.conv2d(F.pad(maps, padding, mode="reflect"), (kernel / kernel.sum()).view(shape))
    return maps.squeeze(1)


def top_count(pixels: int, fraction: float) -> int:
    """How many of ``pixels`` the top ``fraction`` is: ceil(fraction * pixels), robust to float rounding."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction of pixels to keep must be in (0, 1], got {fraction}")
    return math.ceil(round(fraction * pixels, 6))


def keep_top(maps: Tensor, fraction: float) -> Tensor:
    """Keep exactly ceil(fraction * h * w) highest pixels of each map with their soft values; zero the rest.

    Per image, so the batch size never changes the result (the original TAME threshold was batch-wide).
    Ties at the threshold are broken by position, so the count is always exact.
    """
    if top_count(maps[0].numel(), fraction) >= maps[0].numel():
        return maps
    return torch.where(top_set(maps, fraction), maps, torch.zeros_like(maps))


def top_set(maps: Tensor, fraction: float) -> Tensor:
    """Boolean ``[B, ...]``: each map's ceil(fraction * h * w) highest pixels, ties broken by position, so the
    count is exact: the pixels ``keep_top`` keeps, and those the deletion curve deletes first (up to the order of
    ties, which it breaks by a stable sort)."""
    flat = maps.flatten(1)
    count = top_count(flat.shape[1], fraction)
    indices = flat.topk(count, dim=1, sorted=False).indices
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(1, indices, True).view_as(maps)
