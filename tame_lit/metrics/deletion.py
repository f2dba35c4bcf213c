"""Deletion and Insertion (Petsiuk et al. 2018, RISE) as a batched torchmetrics metric.

Pixels are ranked by the explanation map, most salient first. Deletion replaces them, ``step`` at a time, with
zeros (black); insertion starts from a blurred copy and puts the original pixels back. The softmax probability
of the explained class after every step gives a curve per image; the scores are areas under the mean curve over
the fraction of pixels changed (deletion: lower is better, insertion: higher is better), over the whole range
and over the first 20 % only (An & Joe 2022, reading (b) of the spec).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torchvision.transforms.v2.functional import gaussian_blur

from tame_lit.metrics.base import METRICS, Column, Curve, FaithfulnessMetric, Model, ScoredBatch, probabilities

__all__ = [
    "FIRST_FRACTION",
    "DeletionInsertion",
    "auc_weights",
    "blurred",
    "curve_auc",
    "deletion_insertion_curves",
    "fractions",
    "pixel_ranks",
    "resolve_step",
]

# the "first 20 %" view: area under the curve over x in [0, FIRST_FRACTION], divided by FIRST_FRACTION
FIRST_FRACTION = 0.2


def resolve_step(pixels: int, step: int | None, steps: int | None) -> int:
    """Pixels changed per step: ``step`` itself, or ``ceil(pixels / steps)``; exactly one must be given.

    With ``steps`` the curve has ``ceil(pixels / step)`` steps, which can be fewer than ``steps`` when ``steps``
    does not divide ``pixels`` (e.g. 100 pixels, steps=30: step 4, 25 steps).
    """
    if (step is None) == (steps is None):
        raise ValueError(
            f"give exactly one of step (pixels per step) and steps (number of steps), got step={step}, "
            f"steps={steps}; pass step=None to use steps"
        )
    if step is not None and step < 1:
        raise ValueError(f"step must be a positive pixel count, got step={step}")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be a positive number of steps, got steps={steps}")
    if pixels < 1:
        raise ValueError(f"images must have at least one pixel, got {pixels}")
    return step if step is not None else math.ceil(pixels / steps)


def fractions(pixels: int, step: int) -> Tensor:
    """The curve's x grid in float64: ``min(k * step, pixels) / pixels`` for k = 0 .. ceil(pixels / step).

    The last step may be short; using the true fraction keeps the trapezoidal area exact in that case.
    """
    count = math.ceil(pixels / step)
    changed = torch.clamp(torch.arange(count + 1, dtype=torch.float64) * step, max=pixels)
    return changed / pixels


def curve_auc(x: Tensor, y: Tensor, upto: float = 1.0) -> Tensor:
    """Trapezoidal area under ``y(x)`` over ``[0, upto]``, divided by ``upto`` (the curve's mean height there).

    ``x`` must increase from 0 and reach ``upto``; when ``upto`` falls between two grid points the curve is
    interpolated linearly there. With ``upto = 1`` and an even grid this is RISE's
    ``(sum(s) - s_0 / 2 - s_n / 2) / n``.
    """
    x, y = x.double().flatten(), y.double().flatten()
    if x.shape != y.shape or x.numel() < 2:
        raise ValueError(f"need x and y of the same length >= 2, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x[0] != 0 or not bool((x[1:] > x[:-1]).all()):
        raise ValueError(f"x must increase strictly from 0, got {x.tolist()}")
    if not 0.0 < upto <= float(x[-1]):
        raise ValueError(f"upto must be in (0, {float(x[-1])}], got {upto}")
    right = int(torch.searchsorted(x, torch.tensor([upto], dtype=torch.float64)).item())  # first x >= upto
    if x[right] == upto:
        xs, ys = x[: right + 1], y[: right + 1]
    else:
        weight = (upto - x[right - 1]) / (x[right] - x[right - 1])
        y_upto = y[right - 1] + weight * (y[right] - y[right - 1])
        xs = torch.cat([x[:right], x.new_tensor([upto])])
        ys = torch.cat([y[:right], y_upto.reshape(1)])
    return torch.trapezoid(ys, xs) / upto


def auc_weights(x: Tensor, upto: float = 1.0) -> Tensor:
    """``w`` with ``curves @ w == curve_auc(x, curve, upto)`` for every row of ``curves``: the area is linear
    in the curve, so each image's AUC is one product (float64 ``[len(x)]``)."""
    basis = torch.eye(x.numel(), dtype=torch.float64)
    return torch.stack([curve_auc(x, row, upto) for row in basis])


def pixel_ranks(maps: Tensor) -> Tensor:
    """Pixel indices of each ``[B, H, W]`` map, most salient first: ``[B, H * W]`` (long).

    A stable sort breaks ties by pixel position, so an image's ranking never depends on its batch. NaN counts as
    least salient.
    """
    flat = torch.nan_to_num(maps.detach().float().flatten(1), nan=-math.inf)
    return torch.sort(flat, dim=1, descending=True, stable=True).indices


def blurred(images: Tensor, kernel: int = 11, sigma: float = 5.0) -> Tensor:
    """Insertion's starting image: a Gaussian blur of each image, in float32 outside autocast.

    The substrate is data, not part of the model's forward pass, so it does not follow the caller's autocast.
    """
    with torch.autocast(device_type=images.device.type, enabled=False):
        return gaussian_blur(images.float(), [kernel, kernel], [sigma, sigma]).to(images.dtype)


@torch.no_grad()
def deletion_insertion_curves(
    model: Model,
    images: Tensor,
    maps: Tensor,
    targets: Tensor,
    step: int,
    blur_kernel: int = 11,
    blur_sigma: float = 5.0,
    chunk_size: int = 64,
    clean_probs: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-image deletion and insertion curves, each ``[B, n + 1]`` float32 with ``n = ceil(H * W / step)``.

    Point k has the first ``min(k * step, H * W)`` ranked pixels changed. Each perturbed batch is built from the
    clean one when needed (never all n + 1 copies at once); consecutive steps share a forward call up to
    ``chunk_size`` images. ``clean_probs`` (the target's probability on the clean images) fills deletion's
    first and insertion's last point, which are the clean images, saving two forward passes.
    """
    batch, _, height, width = images.shape
    pixels = height * width
    count = math.ceil(pixels / step)
    order = pixel_ranks(maps)
    # rank of every pixel: pixel p is changed at step k iff rank[p] < k * step
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(pixels, device=order.device).expand(batch, pixels).contiguous()
    )
    rank = rank.view(batch, 1, height, width).to(images.device)
    start = blurred(images, blur_kernel, blur_sigma)

    def perturbed(curve: str, k: int) -> Tensor:
        changed = rank < min(k * step, pixels)
        if curve == "deletion":
            return images.masked_fill(changed, 0)
        return torch.where(changed, images, start)

    curves = {name: torch.empty(batch, count + 1, dtype=torch.float32, device=images.device) for name in ("d", "i")}
    jobs = [("deletion", k) for k in range(count + 1)] + [("insertion", k) for k in range(count + 1)]
    if clean_probs is not None:
        clean = clean_probs.detach().to(device=images.device, dtype=torch.float32)
        curves["d"][:, 0] = clean
        curves["i"][:, count] = clean
        jobs = [job for job in jobs if job not in (("deletion", 0), ("insertion", count))]
    per_call = max(1, chunk_size // max(batch, 1))
    for first in range(0, len(jobs), per_call):
        group = jobs[first : first + per_call]
        stacked = torch.cat([perturbed(curve, k) for curve, k in group])
        probs = probabilities(model, stacked, targets.repeat(len(group)), chunk_size).view(len(group), batch)
        for (curve, k), values in zip(group, probs, strict=True):
            curves[curve[0]][:, k] = values
    return curves["d"], curves["i"]


@METRICS.register("deletion")
class DeletionInsertion(FaithfulnessMetric):
    """Deletion and insertion AUCs of the mean curves, over all pixels and over the first ``first`` fraction.

    States are float64 sums of the per-image curves on a common grid and a count, so AUC(mean curve) = mean of
    the per-image AUCs and results are exact when summed across processes; each image's AUCs are kept too.
    The image size, and so the grid, is fixed at the first update after a reset (every process must see at
    least one batch before a synchronised compute, as Lightning's distributed sampler ensures). ``first``:
    An & Joe's "first 20 %" view (keys ``*_first20``), or None for none. ``step``: pixels per step;
    ``steps``, when given, a number of steps instead.
    """

    def __init__(
        self,
        step: int | None = 1792,
        steps: int | None = None,
        blur_kernel: int = 11,
        blur_sigma: float = 5.0,
        chunk_size: int = 64,
        first: float | None = FIRST_FRACTION,
        **kwargs: Any,
    ) -> None:
        step = None if steps is not None else step  # a number of steps, when given, replaces the default step
        resolve_step(1, step, steps)  # validate now, not at the first batch
        if blur_kernel < 1 or blur_kernel % 2 == 0:
            raise ValueError(f"blur_kernel must be a positive odd size, got {blur_kernel}")
        if blur_sigma <= 0:
            raise ValueError(f"blur_sigma must be positive, got {blur_sigma}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if first is not None and not 0.0 < first < 1.0:
            raise ValueError(f"first must be a fraction of pixels in (0, 1) or None, got {first}")
        self.step, self.steps = step, steps
        self.blur_kernel, self.blur_sigma, self.chunk_size = blur_kernel, blur_sigma, chunk_size
        self.first = first
        self.suffix = "" if first is None else f"_first{round(100 * first)}"
        keys = ["deletion_auc", "insertion_auc"]
        if first is not None:
            keys += [f"deletion_auc{self.suffix}", f"insertion_auc{self.suffix}"]
        super().__init__(per_image_keys=keys, **kwargs)
        # empty until the first update sets the grid; "max" keeps the size on every process after a sync
        self.add_state("size", default=torch.zeros(2, dtype=torch.long), dist_reduce_fx="max")
        self.add_state("deletion", default=torch.zeros(0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("insertion", default=torch.zeros(0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, batch: ScoredBatch) -> None:
        images, maps, targets = batch.images, batch.maps, batch.targets
        height, width = images.shape[-2:]
        size = self._size()
        if size is None:
            self.size = torch.tensor([height, width], dtype=torch.long, device=self.size.device)
        elif size != (height, width):
            raise ValueError(
                f"images are {height}x{width} but this metric's curves are for {size[0]}x{size[1]} images "
                "(fixed at the first update; reset the metric or use one metric per image size)"
            )
        step = resolve_step(height * width, self.step, self.steps)
        deletion, insertion = deletion_insertion_curves(
            batch.model, images, maps, targets, step, self.blur_kernel, self.blur_sigma, self.chunk_size,
            batch.clean_probs,
        )  # fmt: skip
        if self.deletion.numel() == 0:
            self.deletion = torch.zeros(deletion.shape[1], dtype=torch.float64, device=self.count.device)
            self.insertion = torch.zeros_like(self.deletion)
        # out of place: states reset under inference mode (trainer.validate) stay usable afterwards
        self.deletion = self.deletion + deletion.double().sum(0).to(self.deletion.device)
        self.insertion = self.insertion + insertion.double().sum(0).to(self.insertion.device)
        self.count = self.count + images.shape[0]
        x = fractions(height * width, step)
        values = {}
        for upto, suffix in ((1.0, ""), (self.first, self.suffix)):
            if upto is None:
                continue
            weights = auc_weights(x, upto).to(deletion.device)
            values[f"deletion_auc{suffix}"] = deletion.double() @ weights
            values[f"insertion_auc{suffix}"] = insertion.double() @ weights
        self.record(batch.indices, **values)

    def compute(self) -> dict[str, float]:
        x, deletion, insertion = self._mean_curves()
        result = {"deletion_auc": float(curve_auc(x, deletion)), "insertion_auc": float(curve_auc(x, insertion))}
        if self.first is not None:
            result[f"deletion_auc{self.suffix}"] = float(curve_auc(x, deletion, self.first))
            result[f"insertion_auc{self.suffix}"] = float(curve_auc(x, insertion, self.first))
        return result

    def columns(self) -> list[Column]:
        columns = [
            Column("deletion_auc", "Deletion ↓", False, primary=True),
            Column("insertion_auc", "Insertion ↑", True, primary=True),
        ]
        if self.first is not None:
            share = f"{100 * self.first:g} %"
            columns += [
                Column(f"deletion_auc{self.suffix}", f"Del. {share} ↓", False),
                Column(f"insertion_auc{self.suffix}", f"Ins. {share} ↑", True),
            ]
        return columns

    def curves(self) -> dict[str, Curve]:
        """The mean curves (over every process) against the fraction of pixels changed."""
        with self.synced():
            x, deletion, insertion = self._mean_curves()
        y_label = "probability of the class"
        return {
            "deletion": Curve("deletion", "Deletion (lower is better)", "fraction of pixels deleted", y_label,
                              x.tolist(), deletion.tolist(), summary_key="deletion_auc"),
            "insertion": Curve("insertion", "Insertion (higher is better)", "fraction of pixels inserted", y_label,
                               x.tolist(), insertion.tolist(), summary_key="insertion_auc"),
        }  # fmt: skip

    def settings(self) -> dict[str, Any]:
        """The step in pixels and the number of steps applied, once the image size is known (after an update)."""
        size = self._size()
        if size is None:
            return {}
        pixels = size[0] * size[1]
        step = resolve_step(pixels, self.step, self.steps)
        return {"image_size": list(size), "step": step, "steps": math.ceil(pixels / step)}

    def _size(self) -> tuple[int, int] | None:
        height, width = (int(value) for value in self.size.tolist())
        return None if height == 0 else (height, width)

    def _mean_curves(self) -> tuple[Tensor, Tensor, Tensor]:
        size = self._size()
        if size is None or int(self.count) == 0:
            raise RuntimeError(f"{type(self).__name__} has no images: call update() before compute() or curves()")
        step = resolve_step(size[0] * size[1], self.step, self.steps)
        count = self.count.double()
        x = fractions(size[0] * size[1], step).to(self.deletion.device)
        return x, self.deletion / count, self.insertion / count

    def _reduce_states(self, incoming_state: dict[str, Any]) -> None:
        """forward() adds the batch's states to the accumulated ones; an empty (not yet sized) side adds zeros."""
        for name in ("deletion", "insertion"):
            local, incoming = getattr(self, name), incoming_state[name]
            if incoming.numel() == 0 and local.numel() > 0:
                incoming_state = {**incoming_state, name: torch.zeros_like(local)}
            elif local.numel() == 0 and incoming.numel() > 0:
                setattr(self, name, torch.zeros_like(incoming))
        local_size, incoming_size = self.size.tolist(), incoming_state["size"].tolist()
        if 0 not in local_size and 0 not in incoming_size and local_size != incoming_size:
            raise ValueError(
                f"images are {local_size[0]}x{local_size[1]} but this metric's curves are for "
                f"{incoming_size[0]}x{incoming_size[1]} images (fixed at the first update)"
            )
        super()._reduce_states(incoming_state)
