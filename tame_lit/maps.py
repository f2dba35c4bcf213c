"""Operations on explanation maps ``[B, h, w]`` shared by heads, explainers and metrics."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["blur_matrix", "keep_top", "normalize", "smooth", "top_count", "top_set", "upsample"]


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
    float32: the kernel and reflected borders of torchvision's ``gaussian_blur`` (2 * ceil(3 sigma) + 1 taps), as
    one matrix product per axis (``blur_matrix``), about 10x faster on a CPU than the convolution at sigma 8 and
    made of constants ONNX exports. A sigma of 0 leaves that axis as it is."""
    if min(sigma) < 0:
        raise ValueError(f"smoothing sigma must be >= 0 pixels, got {tuple(sigma)}")
    maps = maps.float()
    if sigma[1] > 0:
        maps = maps @ blur_matrix(maps.shape[-1], sigma[1], maps.device)
    if sigma[0] > 0:
        maps = blur_matrix(maps.shape[-2], sigma[0], maps.device).T @ maps
    return maps


def blur_matrix(length: int, sigma: float, device: torch.device | str = "cpu") -> Tensor:
    """``M`` [length, length] with ``x @ M`` = the Gaussian blur of each row of ``x`` (standard deviation ``sigma``
    pixels, 2 * ceil(3 sigma) + 1 taps normalised to sum 1, borders reflected without repeating the edge, as
    torchvision's ``gaussian_blur``); taps beyond the reflection's reach (``length - 1``) are cut."""
    half = min(math.ceil(3 * sigma), length - 1)
    offsets = torch.arange(-half, half + 1, device=device)
    weights = torch.exp(-0.5 * (offsets.float() / sigma) ** 2)
    source = (torch.arange(length, device=device)[:, None] + offsets).abs()  # [output, tap], reflected at 0
    source = torch.where(source > length - 1, 2 * (length - 1) - source, source)  # and at length - 1
    # M[s, o]: the weight of every tap of output o that reads source s (a comparison, not a scatter: exports)
    hits = (source[:, :, None] == torch.arange(length, device=device)).float()  # [output, tap, source]
    return torch.einsum("ots,t->so", hits, weights / weights.sum())


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
