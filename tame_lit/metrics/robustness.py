"""Robustness of the explanations to small input noise: max- and avg-sensitivity (Yeh et al., NeurIPS 2019) and
the local Lipschitz estimate (Alvarez-Melis & Jaakkola, 2018).

A map that changes a lot when the image barely changes (noise the classifier hardly notices) is fragile: two
looks at the same object give two different stories. Each metric explains ``samples`` noisy copies
x_j = x + u_j of every image (u_j uniform in [-radius, radius] per value, in [0, 1] pixel units) for the same
target and compares their maps e(x_j) with the evaluation's map e(x): the sensitivities relative to the size of
e(x), the Lipschitz estimate relative to the size of the noise. Lower is better for all three.

They cost ``samples`` explainer passes per image (the evaluation's most expensive metrics, hence off by default);
the three share one set of noisy copies and maps per batch when their ``radius``, ``samples`` and ``seed``
agree (``ScoredBatch.shared``). Each copy's noise comes from its own generator, seeded by a hash of ``seed``,
the image's dataset index and the copy's number: an image's value is the same in any batch or process, and
raising ``samples`` keeps the first copies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from tame_lit.metrics.base import METRICS, ImageMean, ScoredBatch, hashed_seed

__all__ = [
    "AvgSensitivity",
    "LocalLipschitz",
    "MaxSensitivity",
    "NoisyExplanations",
    "Robustness",
    "Sensitivity",
    "noisy_explanations",
    "sample_seed",
    "uniform_noise",
]


def sample_seed(seed: int, index: int, sample: int) -> int:
    """The seed of noisy copy ``sample`` of the image with dataset index ``index`` (``hashed_seed``)."""
    return hashed_seed(f"robustness/{seed}/{index}/{sample}")


def uniform_noise(
    indices: Tensor,
    shape: Sequence[int],
    radius: float,
    samples: int,
    seed: int,
    device: str | torch.device | None = None,
) -> Tensor:
    """The noise u_j of each image's copies, float32 ``[B, samples, *shape]``, uniform in [-radius, radius]: copy j
    of the image with dataset index i from a generator seeded by ``sample_seed(seed, i, j)`` on ``device``."""
    noise = torch.empty(len(indices), samples, *shape, device=device)
    for row, index in enumerate(indices.tolist()):
        for sample in range(samples):
            generator = torch.Generator(device=noise.device).manual_seed(sample_seed(seed, index, sample))
            noise[row, sample].uniform_(-radius, radius, generator=generator)
    return noise


class NoisyExplanations(NamedTuple):
    """The explainer's answer on a batch's noisy copies: ``maps`` float32 ``[B, n, H, W]`` (e(x_j)),
    ``map_distances`` ``[B, n]`` ||e(x) - e(x_j)||_2 and ``image_distances`` ``[B, n]`` ||x - x_j||_2 (over all
    3 x H x W values, of the float32 copies the explainer saw), both float64."""

    maps: Tensor
    map_distances: Tensor
    image_distances: Tensor


def noisy_explanations(
    batch: ScoredBatch, radius: float, samples: int, seed: int, chunk_size: int = 64
) -> NoisyExplanations:
    """Explain ``samples`` noisy copies of each image of ``batch`` for its target, all B x n copies through
    ``batch.explain`` (``chunk_size`` images per explainer call), and measure them against the batch.

    The copies are NOT clamped to [0, 1]: clamping would shrink the noise of pixels near 0 or 1 (so the
    perturbation's size would depend on the image) and would differ from Quantus's ``uniform_noise``, which adds
    the same samples unclipped (explainers take such images: the model normalises them like any other).
    """
    images = batch.images
    size, shape = images.shape[0], tuple(images.shape[1:])
    noise = uniform_noise(batch.indices, shape, radius, samples, seed, images.device)
    noisy = (images[:, None] + noise.to(images.dtype)).flatten(0, 1)
    del noise
    targets = batch.targets.to(images.device).repeat_interleave(samples)
    maps = batch.explain(noisy, targets, chunk_size).detach().float().reshape(size, samples, *shape[-2:])
    map_distances = _distances(maps, batch.maps.to(maps.device))
    image_distances = _distances(noisy.view(size, samples, *shape), images)
    return NoisyExplanations(maps, map_distances, image_distances)


def _distances(copies: Tensor, originals: Tensor) -> Tensor:
    """``[B, n]`` float64 Euclidean distance of each copy ``copies[b, j]`` to ``originals[b]`` over all values, one
    image at a time: 64 x 10 copies of 224 x 224 images would be 0.8 GB of doubles at once."""
    result = torch.zeros(copies.shape[:2], dtype=torch.float64, device=copies.device)
    for row in range(copies.shape[0]):
        result[row] = (copies[row].double() - originals[row].double()).flatten(1).norm(dim=1)
    return result


class Robustness(ImageMean):
    """The shared part of the three: options, the shared noisy copies, and the per-image values of ``score``.

    ``radius``: the noise's half-width in [0, 1] pixel units (> 0); ``samples``: noisy copies per image (>= 1);
    ``seed``: the noise's seed; ``chunk_size``: images per explainer call (changes no value).
    """

    higher_is_better = False
    default_enabled = False

    def __init__(
        self, radius: float = 0.05, samples: int = 10, seed: int = 0, chunk_size: int = 64, **kwargs: Any
    ) -> None:
        if not (isinstance(radius, int | float) and math.isfinite(radius) and radius > 0):
            raise ValueError(f"{self.key}.radius must be a finite number > 0 ([0, 1] pixel units), got {radius!r}")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"{self.key}.samples must be an integer >= 1 (noisy copies per image), got {samples!r}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"{self.key}.chunk_size must be an integer >= 1, got {chunk_size!r}")
        super().__init__(**kwargs)
        self.radius, self.samples, self.seed, self.chunk_size = float(radius), samples, int(seed), chunk_size

    def noisy(self, batch: ScoredBatch) -> NoisyExplanations:
        """The batch's noisy copies and their maps, computed once for every metric with these settings."""
        key = ("noisy", self.radius, self.samples, self.seed)
        return batch.shared(
            key, lambda: noisy_explanations(batch, self.radius, self.samples, self.seed, self.chunk_size)
        )

    def score(self, batch: ScoredBatch, noisy: NoisyExplanations) -> tuple[Tensor, Tensor]:
        """``(rows, values)``: the batch rows scored ``[m]`` and their values ``[m]``."""
        raise NotImplementedError

    def update(self, batch: ScoredBatch) -> None:
        if batch.size == 0:
            return
        rows, values = self.score(batch, self.noisy(batch))
        self.add(batch.indices[rows.to(batch.indices.device)], values)


class Sensitivity(Robustness):
    """||e(x) - e(x_j)||_F / ||e(x)||_F per copy, reduced over the copies by ``reduce``; images with a blank map
    e(x) (all zero: the ratio is undefined) are left out (not counted, not recorded)."""

    def reduce(self, ratios: Tensor) -> Tensor:
        raise NotImplementedError

    def score(self, batch: ScoredBatch, noisy: NoisyExplanations) -> tuple[Tensor, Tensor]:
        norms = batch.maps.double().flatten(1).norm(dim=1).to(noisy.map_distances.device)
        rows = torch.nonzero(norms > 0).flatten()
        ratios = noisy.map_distances[rows] / norms[rows, None]
        return rows, self.reduce(ratios)


@METRICS.register("max_sensitivity")
class MaxSensitivity(Sensitivity):
    """Max-sensitivity (Yeh et al. 2019): max_j ||e(x) - e(x_j)||_F / ||e(x)||_F over the ``samples`` noisy copies
    (lower is better: 0 when no copy changes the map). Images with a blank map e(x) are left out of the mean.
    Costs ``samples`` explainer passes per image, shared with ``avg_sensitivity`` and ``local_lipschitz`` when
    their ``radius``, ``samples`` and ``seed`` agree. Quantus's ``MaxSensitivity`` with the same copies, Frobenius
    norms, no normalisation and ``return_nan_when_prediction_changes=False`` gives the same values."""

    key = "max_sensitivity"
    title = "Max sens. ↓"

    def reduce(self, ratios: Tensor) -> Tensor:
        return ratios.amax(dim=1)


@METRICS.register("avg_sensitivity")
class AvgSensitivity(Sensitivity):
    """Avg-sensitivity (Yeh et al. 2019): mean_j ||e(x) - e(x_j)||_F / ||e(x)||_F over the ``samples`` noisy
    copies (lower is better); never above max-sensitivity. Images with a blank map e(x) are left out of the mean.
    Costs ``samples`` explainer passes per image, shared with ``max_sensitivity`` and ``local_lipschitz`` when
    their ``radius``, ``samples`` and ``seed`` agree. Matches Quantus's ``AvgSensitivity`` on the same copies."""

    key = "avg_sensitivity"
    title = "Avg sens. ↓"

    def reduce(self, ratios: Tensor) -> Tensor:
        return ratios.mean(dim=1)


@METRICS.register("local_lipschitz")
class LocalLipschitz(Robustness):
    """Local Lipschitz estimate (Alvarez-Melis & Jaakkola 2018): max_j ||e(x) - e(x_j)||_2 / ||x - x_j||_2 over the
    ``samples`` noisy copies, images in [0, 1] units over all 3 x H x W values (lower is better: how far the map
    moves per unit of input change, at worst). Defined for blank maps too, so every image counts; a copy equal to
    its image (a radius below float32 resolution) counts 0. Costs ``samples`` explainer passes per image, shared
    with the sensitivities when ``radius``, ``samples`` and ``seed`` agree. Quantus's ``LocalLipschitzEstimate``
    on the same copies with ``normalise=False`` gives the same values (it adds 1e-10 to the denominator; its
    default noise is Gaussian, std 0.1)."""

    key = "local_lipschitz"
    title = "Local Lipschitz ↓"

    def score(self, batch: ScoredBatch, noisy: NoisyExplanations) -> tuple[Tensor, Tensor]:
        distances = noisy.image_distances
        ratios = noisy.map_distances / distances.clamp_min(torch.finfo(torch.float64).tiny)
        ratios = torch.where(distances > 0, ratios, torch.zeros_like(ratios))
        return torch.arange(batch.size, device=ratios.device), ratios.amax(dim=1)
