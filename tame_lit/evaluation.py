"""Scoring explainers: every explainer on the same batches, with the same metric code, in one pass.

``EvaluationModule`` is a LightningModule for ``trainer.test``: each batch is loaded once, classified
once, and explained by each explainer in turn; its maps feed the faithfulness metrics of that explainer.
Metrics keep sum states, and the data module hands every process its own images exactly once, so
numbers are the same with one process or many. An explainer that fails is recorded and skipped; the
others go on.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import SumMetric
from torchmetrics.classification import MulticlassAccuracy

from tame_lit.backbones import Backbone
from tame_lit.explainers import Explainer
from tame_lit.metrics import (
    AverageDropIncrease,
    DeletionInsertion,
    PointingGame,
    RoadScore,
    class_probability,
    masked_probability,
)

__all__ = ["EvaluationModule", "MetricSettings", "percent"]

log = logging.getLogger(__name__)


def percent(fraction: float) -> str:
    """0.15 -> "15" (metric names say percent of pixels)."""
    value = 100 * fraction
    return str(round(value)) if math.isclose(value, round(value)) else f"{value:g}"


@dataclass
class MetricSettings:
    """What to measure. ``keep``: AD/IC at these fractions of pixels kept (TAME: 100/50/15 %); ``first20``:
    An & Joe's "first 20 %" view (AD/IC with 20 % kept, deletion/insertion AUC over the first 20 %);
    ``deletion_step``/``deletion_steps``: pixels per deletion/insertion step, or the number of steps;
    ``road_levels``: fractions removed by ROAD; ``chunk_size``: perturbed images per forward pass."""

    keep: Sequence[float] = (1.0, 0.5, 0.15)
    first20: bool = True
    deletion: bool = True
    deletion_step: int | None = 1792
    deletion_steps: int | None = None
    blur_kernel: int = 11
    blur_sigma: float = 5.0
    road: bool = True
    road_levels: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    road_noise: float = 0.01
    pointing_tolerance: float = 15.0
    chunk_size: int = 64
    seed: int = 0

    @property
    def keep_fractions(self) -> list[float]:
        fractions = [float(f) for f in self.keep]
        if self.first20 and not any(math.isclose(f, 0.2) for f in fractions):
            fractions.append(0.2)
        return fractions


@dataclass
class Grid:
    """The first images of the set with every explainer's map, for the heatmap grid."""

    size: int
    images: list[Tensor] = field(default_factory=list)
    predictions: list[int] = field(default_factory=list)
    probabilities: list[float] = field(default_factory=list)
    maps: dict[str, list[Tensor]] = field(default_factory=dict)


class EvaluationModule(L.LightningModule):
    """Runs ``explainers`` (name -> ``Explainer`` over ``backbone``) on each test batch and scores them."""

    def __init__(
        self,
        backbone: Backbone,
        explainers: Mapping[str, Explainer],
        settings: MetricSettings | Mapping[str, Any] | None = None,
        grid_images: int = 8,
    ) -> None:
        super().__init__()
        if not explainers:
            raise ValueError("nothing to evaluate: no explainers")
        self.backbone = backbone
        self.explainers = dict(explainers)
        self.settings = settings if isinstance(settings, MetricSettings) else MetricSettings(**(settings or {}))
        # trained heads are modules: registered so that they move to the device with the rest
        self.heads = nn.ModuleDict(
            {name: e.head for name, e in self.explainers.items() if isinstance(getattr(e, "head", None), nn.Module)}
        )
        self.scores = nn.ModuleDict({name: self._metrics() for name in self.explainers})
        self.accuracy = MulticlassAccuracy(backbone.num_classes, average="micro", ignore_index=-1)
        self.labelled = SumMetric()
        self.skipped = SumMetric()
        self.failures: dict[str, str] = {}
        self.grid = Grid(grid_images)
        self.results: dict[str, dict[str, float]] = {}
        self.curves: dict[str, dict[str, Any]] = {}
        self.summary: dict[str, Any] = {}

    def _metrics(self) -> nn.ModuleDict:
        s = self.settings
        metrics: dict[str, nn.Module] = {f"ad_ic@{percent(f)}": AverageDropIncrease() for f in s.keep_fractions}
        if s.deletion:
            metrics["deletion"] = DeletionInsertion(
                step=s.deletion_step if s.deletion_steps is None else None,
                steps=s.deletion_steps,
                blur_kernel=s.blur_kernel,
                blur_sigma=s.blur_sigma,
                chunk_size=s.chunk_size,
            )
        if s.road:
            for order in ("morf", "lerf"):
                metrics[f"road_{order}"] = RoadScore(
                    levels=tuple(s.road_levels), order=order, noise=s.road_noise, seed=s.seed, chunk_size=s.chunk_size
                )
        metrics["pointing"] = PointingGame(tolerance=s.pointing_tolerance)
        for timer in ("seconds", "first_batch_seconds"):
            metrics[timer] = SumMetric()
            metrics[f"{timer}_images"] = SumMetric()
        return nn.ModuleDict(metrics)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        images: Tensor = batch["images"]
        self.skipped.update(float(batch.get("skipped", 0)))
        if images.shape[0] == 0:
            return
        with torch.no_grad():
            logits = self.backbone(images)
        predictions = logits.argmax(dim=1)
        clean_probs = class_probability(logits, predictions)
        labels = batch["labels"]
        known = (labels >= 0) & (labels < self.backbone.num_classes)  # -1: no label
        self.labelled.update(float(known.sum()))
        if known.any():
            self.accuracy.update(predictions[known], labels[known])
        grid_rows = self._remember_for_grid(images, predictions, clean_probs)
        for name, explainer in self.explainers.items():
            if name in self.failures:
                continue
            try:
                started = time.perf_counter()
                maps = explainer(images, predictions)
                if images.device.type == "cuda":
                    torch.cuda.synchronize(images.device)
                # the first batch pays one-off costs (allocations, autograd and kernel set-up): timed apart
                timer = "first_batch_seconds" if batch_idx == 0 else "seconds"
                self.scores[name][timer].update(time.perf_counter() - started)
                self.scores[name][f"{timer}_images"].update(float(images.shape[0]))
                self._score(self.scores[name], images, maps, predictions, clean_probs, batch)
            except Exception as error:  # one broken explainer must not cost the others their results
                self.failures[name] = f"{type(error).__name__}: {error}"
                log.exception("explainer %r failed on batch %d; it is skipped from here on", name, batch_idx)
                continue
            if grid_rows:
                self.grid.maps.setdefault(name, []).extend(maps[:grid_rows].detach().float().cpu().unbind(0))

    def _score(
        self, metrics: nn.ModuleDict, images: Tensor, maps: Tensor, targets: Tensor, clean_probs: Tensor, batch: dict
    ) -> None:
        with torch.no_grad():
            for fraction in self.settings.keep_fractions:
                masked = masked_probability(self.backbone, images, maps, targets, fraction)
                metrics[f"ad_ic@{percent(fraction)}"].update(clean_probs, masked)
            if "deletion" in metrics:
                metrics["deletion"].update(self.backbone, images, maps, targets, clean_probs=clean_probs)
            for order in ("morf", "lerf"):
                if f"road_{order}" in metrics:
                    metrics[f"road_{order}"].update(self.backbone, images, maps, targets, targets, batch["indices"])
            if "boxes" in batch:
                metrics["pointing"].update(maps, targets, batch["boxes"])

    def _remember_for_grid(self, images: Tensor, predictions: Tensor, probabilities: Tensor) -> int:
        """Keep the first images rank zero sees; returns how many rows of this batch were kept."""
        if not self.trainer.is_global_zero:
            return 0
        rows = max(0, min(self.grid.size - len(self.grid.images), images.shape[0]))
        self.grid.images.extend(images[:rows].detach().float().cpu().unbind(0))
        self.grid.predictions.extend(predictions[:rows].tolist())
        self.grid.probabilities.extend(probabilities[:rows].tolist())
        return rows

    def on_test_epoch_end(self) -> None:
        """Reduce every metric across processes (all ranks take part in each reduction)."""
        with warnings.catch_warnings():  # pointing without boxes, or one batch only: never updated, by design
            warnings.filterwarnings("ignore", message=r".*compute.* was called before the ``update``")
            self._compute_results()

    def _compute_results(self) -> None:
        failures = self._gathered_failures()
        for name, metrics in self.scores.items():
            if name in failures:  # the same on every process, so every process skips the same metrics
                continue
            row: dict[str, float] = {}
            curves: dict[str, Any] = {}
            for key, metric in metrics.items():
                if key.startswith("ad_ic@"):
                    values = metric.compute()
                    row[f"AD@{key[6:]}"] = float(values["AD"])
                    row[f"IC@{key[6:]}"] = float(values["IC"])
                    row["images"] = float(values["count"])  # synced (metric.count is this process's)
                elif key == "deletion":
                    values = metric.compute()
                    row.update({k: float(v) for k, v in values.items() if self.settings.first20 or "first20" not in k})
                    curves["deletion_insertion"] = metric.curves()
                elif key.startswith("road_"):
                    values = metric.compute()
                    row[key] = float(values["accuracy"])
                    row[f"{key}_probability"] = float(values["probability"])
                    for level_key, value in values.items():
                        if "@" in level_key:
                            kind, level = level_key.split("@")
                            row[f"{key}@{level}" if kind == "accuracy" else f"{key}_{kind}@{level}"] = float(value)
                    curves[key] = metric.curve()
                elif key == "pointing":
                    values = metric.compute()  # without boxes never updated: count 0, not shown
                    if values["pointing_images"] > 0:
                        row.update({k: float(v) for k, v in values.items()})
                elif key in ("seconds", "first_batch_seconds"):
                    images = float(metrics[f"{key}_images"].compute())
                    if images > 0 and (key == "seconds" or "seconds_per_image" not in row):
                        row["seconds_per_image"] = float(metric.compute()) / images
            self.results[name] = row
            self.curves[name] = curves
        labelled = float(self.labelled.compute())
        self.summary = {
            "top1_accuracy": float(self.accuracy.compute()) if labelled > 0 else None,
            "labelled_images": int(labelled),
            "skipped_images": int(self.skipped.compute()),
            "failed": failures,
        }

    def _gathered_failures(self) -> dict[str, str]:
        """Failures seen by any process (an explainer that failed anywhere is not reported as if whole)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return dict(self.failures)
        gathered: list[dict[str, str]] = [{} for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather_object(gathered, self.failures)
        merged: dict[str, str] = {}
        for failures in gathered:
            merged.update(failures)
        return merged
