"""Heatmap overlays and grids with matplotlib (no pyplot state, safe in workers and without a display)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from torch import Tensor

from tame_lit.io import atomic_path

__all__ = ["overlay", "overlay_grid", "save_figure"]


def overlay(image: Tensor, saliency: Tensor, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blend a [0, 1] map, coloured with ``cmap``, over a [3, H, W] image in [0, 1]: ``[H, W, 3]`` floats."""
    rgb = image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    heat = colormaps[cmap](saliency.detach().float().clamp(0, 1).cpu().numpy())[..., :3]
    return (1 - alpha) * rgb + alpha * heat


def overlay_grid(
    images: Tensor, maps: Tensor, titles: Sequence[str] | None = None, columns: int = 4, alpha: float = 0.5
) -> Figure:
    """A grid of overlays, one per image, with optional titles (class name and probability)."""
    count = images.shape[0]
    columns = max(1, min(columns, count))
    rows = (count + columns - 1) // columns
    figure = Figure(figsize=(3 * columns, 3.2 * rows), layout="constrained")
    axes = np.atleast_1d(figure.subplots(rows, columns)).ravel()
    for index, axis in enumerate(axes):
        axis.axis("off")
        if index < count:
            axis.imshow(overlay(images[index], maps[index], alpha))
            if titles:
                axis.set_title(titles[index], fontsize=9)
    return figure


def save_figure(figure: Figure, path: str | os.PathLike, dpi: int = 100) -> None:
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=dpi, format=os.path.splitext(str(path))[1].lstrip(".") or "png")
