"""Heatmap overlays and grids with matplotlib (no pyplot state, safe in workers and without a display)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from torch import Tensor

from tame_lit.io import atomic_path

__all__ = ["curve_plot", "explainer_grid", "overlay", "overlay_figure", "overlay_grid", "save_figure"]


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


def explainer_grid(
    images: Tensor, maps: dict[str, Tensor], row_titles: Sequence[str] | None = None, alpha: float = 0.5
) -> Figure:
    """Images down, explainers across: the image, then each explainer's overlay (evaluation reports); a map
    of NaNs (an image the explainer did not score) leaves its panel blank."""
    names = list(maps)
    rows, columns = images.shape[0], len(names) + 1
    figure = Figure(figsize=(2.2 * columns, 2.3 * rows), layout="constrained")
    axes = np.asarray(figure.subplots(rows, columns, squeeze=False))
    for row in range(rows):
        axes[row, 0].imshow(images[row].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy())
        if row_titles:
            axes[row, 0].set_title(row_titles[row], fontsize=8)
        for column, name in enumerate(names, start=1):
            if row < maps[name].shape[0] and not maps[name][row].isnan().all():  # NaN: not scored (a subset)
                axes[row, column].imshow(overlay(images[row], maps[name][row], alpha))
            if row == 0:
                axes[row, column].set_title(name, fontsize=9)
        for axis in axes[row]:
            axis.axis("off")
    return figure


def curve_plot(
    curves: dict[str, tuple[Sequence[float], Sequence[float]]],
    title: str,
    xlabel: str,
    ylabel: str,
    styles: dict[str, str] | None = None,
    groups: dict[str, str] | None = None,
) -> Figure:
    """Line plot of named ``(x, y)`` curves (deletion/insertion, ROAD), one line each; curves of the same
    ``groups`` entry (e.g. one explainer's MoRF and LeRF) share a colour, ``styles`` sets line styles."""
    figure = Figure(figsize=(5.5, 4), layout="constrained")
    axis = figure.subplots()
    group_of = groups or {label: label for label in curves}
    colours = {group: f"C{index % 10}" for index, group in enumerate(dict.fromkeys(group_of.values()))}
    for label, (x, y) in curves.items():
        colour = colours.get(group_of.get(label, label))
        axis.plot(list(x), list(y), (styles or {}).get(label, "-"), color=colour, label=label, linewidth=1.5)
    axis.set_title(title)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    return figure


def overlay_figure(image: Tensor, saliency: Tensor, title: str, alpha: float = 0.5, cmap: str = "jet") -> Figure:
    """One image with its map over it, a colour bar for the map's values, and a title (tame-explain)."""
    figure = Figure(figsize=(4.6, 4), layout="constrained")
    axis = figure.subplots()
    axis.imshow(image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy())
    heat = axis.imshow(saliency.detach().float().cpu().numpy(), cmap=cmap, alpha=alpha, vmin=0, vmax=1)
    figure.colorbar(heat, ax=axis, fraction=0.046, pad=0.04)
    axis.set_title(title, fontsize=10)
    axis.axis("off")
    return figure
