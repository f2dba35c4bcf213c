"""Scoring explainers: every explainer on the same batches, with the same metric code, in one pass.

``EvaluationModule`` is a LightningModule for ``trainer.test``: each batch is loaded once, classified
once, and explained by each explainer in turn; its maps feed the faithfulness metrics of that explainer.
Every registered metric (``tame_lit.metrics``) sees the same ``ScoredBatch`` and says itself which columns
and curves it gives, so this module only loops over them. Metrics keep sum states and per-image values,
and the data module hands every process its own images exactly once, so numbers are the same with one
process or many. From the per-image values come each number's confidence interval and each explainer's paired
comparison with a reference (``compare_to``; ``tame_lit.statistics``). An explainer that fails is recorded and
skipped; the others go on.
"""

from __future__ import annotations

import logging
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

from tame_lit import metrics as metric_registry
from tame_lit import statistics
from tame_lit.backbones import Backbone
from tame_lit.explainers import Explainer
from tame_lit.metrics import Column, ScoredBatch, class_probability

__all__ = ["TIMING_COLUMNS", "EvaluationModule", "NothingScoredError", "metric_columns"]


class NothingScoredError(RuntimeError):
    """Not one image could be scored (all unreadable, too large or failing the transform): no result exists."""


log = logging.getLogger(__name__)

# what every evaluation reports beside its metrics' columns
TIMING_COLUMNS = (
    Column("images", "images", None, digits=0, table=False),
    Column("seconds_per_image", "s / image", None, digits=4),
)


def metric_columns(metrics: Mapping[str, nn.Module]) -> list[Column]:
    """The columns of ``metrics`` in order (each key once), then the timing columns."""
    columns: dict[str, Column] = {}
    for metric in metrics.values():
        for column in metric.columns():
            columns.setdefault(column.key, column)
    for column in TIMING_COLUMNS:
        columns.setdefault(column.key, column)
    return list(columns.values())


@dataclass
class Grid:
    """Images of as many classes as possible with every explainer's map, for the heatmap grid.

    Kept in loading order: the first image of each class (the dataset's label, else the predicted class),
    and, in case the set has fewer classes than ``size``, the first images of classes already shown.
    ``selected()`` gives the grid: new classes first, then repeats, ``size`` in all.
    """

    size: int
    images: list[Tensor] = field(default_factory=list)
    predictions: list[int] = field(default_factory=list)
    probabilities: list[float] = field(default_factory=list)
    maps: dict[str, list[Tensor]] = field(default_factory=dict)
    new_class: list[bool] = field(default_factory=list)
    classes: set[int] = field(default_factory=set)

    def rows_to_keep(self, keys: list[int]) -> list[int]:
        """Which rows of a batch (their class ``keys``) to keep, marking them as new classes or repeats."""
        rows = []
        for row, key in enumerate(keys):
            new = key not in self.classes
            if new and self.new_class.count(True) < self.size:
                self.classes.add(key)
            elif new or self.new_class.count(False) >= self.size:
                continue
            rows.append(row)
            self.new_class.append(new)
        return rows

    def selected(self) -> tuple[list[Tensor], list[int], list[float], dict[str, list[Tensor]]]:
        """``(images, predictions, probabilities, maps)`` of the grid."""
        order = sorted(range(len(self.new_class)), key=lambda i: not self.new_class[i])[: self.size]  # stable
        maps = {name: [m[i] for i in order if i < len(m)] for name, m in self.maps.items()}
        return (
            [self.images[i] for i in order],
            [self.predictions[i] for i in order],
            [self.probabilities[i] for i in order],
            maps,
        )


@dataclass
class _Chosen:
    """The rows of a batch one explainer scores (all of them unless it has a subset)."""

    images: Tensor
    predictions: Tensor
    indices: Tensor
    boxes: Sequence[Tensor] | None
    logits: Tensor
    rows: Tensor | None

    @classmethod
    def of(cls, rows: Tensor | None, images, predictions, indices, boxes, logits) -> _Chosen:
        if rows is None:
            return cls(images, predictions, indices, boxes, logits, None)
        kept = [box for box, keep in zip(boxes, rows.tolist(), strict=True) if keep] if boxes is not None else None
        return cls(images[rows], predictions[rows], indices[rows], kept, logits[rows], rows)

    def grid_maps(self, maps: Tensor, grid_rows: list[int]) -> list[Tensor]:
        """The maps of the batch's ``grid_rows``; NaN (drawn blank) for rows outside the subset."""
        maps = maps.detach().float().cpu()
        if self.rows is None:
            return list(maps[grid_rows].unbind(0))
        position = (self.rows.cpu().long().cumsum(0) - 1).tolist()
        blank = torch.full(maps.shape[1:], float("nan"))
        return [maps[position[row]] if self.rows[row] else blank for row in grid_rows]


class EvaluationModule(L.LightningModule):
    """Runs ``explainers`` (name -> ``Explainer`` over ``backbone``) on each test batch and scores them."""

    def __init__(
        self,
        backbone: Backbone,
        explainers: Mapping[str, Explainer],
        metrics: Mapping[str, Mapping[str, Any] | bool | None] | None = None,
        shared: Mapping[str, Any] | None = None,
        grid_images: int = 8,
        compare_to: str | None = "gradcam",
        confidence: float = 0.95,
        resamples: int = 2000,
        subsets: Mapping[str, Sequence[int]] | None = None,
    ) -> None:
        """``metrics``: ``{name: options}`` of registered metrics (``tame_lit.metrics.available()``; options
        ``{}``/``True`` for the metric's defaults, ``False``/``None`` to leave it out); None: every registered
        metric that is on by default (``default_enabled``). ``shared``: settings given to every metric whose
        constructor takes them (the run's ``seed``, which also seeds the bootstrap). ``compare_to``: the
        explainer every other one is compared with, image by image (None: no comparisons); ``confidence``: of
        every interval; ``resamples``: bootstrap resamples per interval. ``subsets``: explainers scored on only
        these dataset indices (an expensive method on a class-balanced subset); they are compared with the
        reference on the images both scored."""
        super().__init__()
        if not explainers:
            raise ValueError("nothing to evaluate: no explainers")
        statistics.check_settings(confidence, resamples)  # before any image is explained
        if compare_to is not None and compare_to not in explainers:
            log.warning(
                "compare_to=%r is not among the explainers %s: no paired comparisons (add it to explainers, or "
                "set compare_to to one of them or null)", compare_to, list(explainers),
            )  # fmt: skip
        self.compare_to = compare_to if compare_to in explainers else None
        self.confidence, self.resamples = float(confidence), int(resamples)
        self.backbone = backbone
        self.explainers = dict(explainers)
        unknown = sorted(set(subsets or {}) - set(self.explainers))
        if unknown:
            raise ValueError(f"subsets names {unknown}, which are not among the explainers {list(self.explainers)}")
        self.subsets = {
            name: torch.as_tensor(list(indices), dtype=torch.long) for name, indices in (subsets or {}).items()
        }
        if metrics is None:
            metrics = {name: cls.default_enabled for name, cls in metric_registry.METRICS.items()}
        chosen = dict(metrics)
        self.metric_options = {
            name: {} if options is True else dict(options)
            for name, options in chosen.items()
            if options is not False and options is not None
        }
        if not self.metric_options:
            raise ValueError(f"nothing to measure: no metrics; available: {metric_registry.available()}")
        self.shared = dict(shared or {})
        # trained heads are modules: registered so that they move to the device with the rest
        self.heads = nn.ModuleDict(
            {name: e.head for name, e in self.explainers.items() if isinstance(getattr(e, "head", None), nn.Module)}
        )
        self.scores = nn.ModuleDict({name: self._metrics() for name in self.explainers})
        self.timing = nn.ModuleDict({name: self._timers() for name in self.explainers})
        self.columns = metric_columns(next(iter(self.scores.values())))
        self.accuracy = MulticlassAccuracy(backbone.num_classes, average="micro", ignore_index=-1)
        self.labelled = SumMetric()
        self.skipped = SumMetric()
        self.failures: dict[str, str] = {}
        self.grid = Grid(grid_images)
        self.results: dict[str, dict[str, float]] = {}
        self.curves: dict[str, dict[str, Any]] = {}
        self.per_image: dict[str, dict[str, dict[str, Tensor]]] = {}
        # per metric, the settings it applied beyond its options (the same for every explainer): for the report
        self.metric_settings: dict[str, dict[str, Any]] = {}
        self.summary: dict[str, Any] = {}

    def _metrics(self) -> nn.ModuleDict:
        return nn.ModuleDict(
            {
                name: metric_registry.create(name, self.shared, **options)
                for name, options in self.metric_options.items()
            }
        )

    @staticmethod
    def _timers() -> nn.ModuleDict:
        names = ("seconds", "first_batch_seconds", "seconds_images", "first_batch_seconds_images", "images")
        return nn.ModuleDict({name: SumMetric() for name in names})

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
        grid_rows = self._remember_for_grid(images, labels.to(predictions.device), predictions, clean_probs)
        for name, explainer in self.explainers.items():
            if name in self.failures:
                continue
            rows = self._rows_of(name, batch["indices"])
            chosen = _Chosen.of(rows, images, predictions, batch["indices"], batch.get("boxes"), logits)
            if chosen.images.shape[0] == 0:  # none of its subset here: blank grid panels keep the rows aligned
                no_maps = images.new_empty(0, *images.shape[-2:])
                self.grid.maps.setdefault(name, []).extend(chosen.grid_maps(no_maps, grid_rows))
                continue
            try:
                started = time.perf_counter()
                maps = explainer(chosen.images, chosen.predictions)
                if images.device.type == "cuda":
                    torch.cuda.synchronize(images.device)
                # the first batch pays one-off costs (allocations, autograd and kernel set-up): timed apart
                timer = "first_batch_seconds" if batch_idx == 0 else "seconds"
                self.timing[name][timer].update(time.perf_counter() - started)
                self.timing[name][f"{timer}_images"].update(float(chosen.images.shape[0]))
                scored = ScoredBatch(
                    self.backbone,
                    chosen.images,
                    maps,
                    chosen.predictions,
                    chosen.indices,
                    chosen.boxes,
                    chosen.logits,
                    explainer=explainer,
                )
                with torch.no_grad():
                    for metric in self.scores[name].values():
                        metric.update(scored)
                self.timing[name]["images"].update(float(chosen.images.shape[0]))
            except Exception as error:  # one broken explainer must not cost the others their results
                self.failures[name] = f"{type(error).__name__}: {error}"
                log.exception("explainer %r failed on batch %d; it is skipped from here on", name, batch_idx)
                continue
            if grid_rows:
                self.grid.maps.setdefault(name, []).extend(chosen.grid_maps(maps, grid_rows))

    def _rows_of(self, name: str, indices: Tensor) -> Tensor | None:
        """Which rows of a batch ``name`` scores (its subset), or None for all of them."""
        subset = self.subsets.get(name)
        return None if subset is None else torch.isin(indices.cpu(), subset).to(indices.device)

    def _remember_for_grid(self, images: Tensor, labels: Tensor, predictions: Tensor, probabilities: Tensor) -> list:
        """Keep the grid candidates rank zero sees (``Grid``), so the grid spans classes even when the images
        come sorted by class; returns the rows kept."""
        if not self.trainer.is_global_zero:
            return []
        pairs = zip(labels.tolist(), predictions.tolist(), strict=True)
        keys = [label if label >= 0 else prediction for label, prediction in pairs]
        rows = self.grid.rows_to_keep(keys)
        self.grid.images.extend(images[rows].detach().float().cpu().unbind(0))
        self.grid.predictions.extend(predictions[rows].tolist())
        self.grid.probabilities.extend(probabilities[rows].tolist())
        return rows

    def on_test_epoch_end(self) -> None:
        """Reduce every metric across processes (all ranks take part in each reduction)."""
        with warnings.catch_warnings():  # pointing without boxes, or one batch only: never updated, by design
            warnings.filterwarnings("ignore", message=r".*compute.* was called before the ``update``")
            self._compute_results()

    def _compute_results(self) -> None:
        scored = sum(float(timing["images"].compute()) for timing in self.timing.values())  # summed over processes
        if self.timing and scored == 0:
            raise NothingScoredError(
                f"no image was scored: the {int(self.skipped.compute())} image(s) of the evaluated set could not be "
                "used (unreadable, too large or failing the transform; the warnings name them)"
            )
        failures = self._gathered_failures()
        for name, metrics in self.scores.items():
            if name in failures:  # the same on every process, so every process skips the same metrics
                continue
            row: dict[str, float] = {}
            curves: dict[str, Any] = {}
            per_image: dict[str, dict[str, Tensor]] = {}
            for metric_name, metric in metrics.items():
                row.update(metric.compute())
                self.metric_settings.setdefault(metric_name, metric.settings())
                curves.update({key: curve.to_dict() for key, curve in metric.curves().items()})
                per_image[metric_name] = metric.per_image()
            timing = {key: float(timer.compute()) for key, timer in self.timing[name].items()}
            row["images"] = timing["images"]
            for key in ("seconds", "first_batch_seconds"):  # after the first batch when there are several
                if timing[f"{key}_images"] > 0 and (key == "seconds" or "seconds_per_image" not in row):
                    row["seconds_per_image"] = timing[key] / timing[f"{key}_images"]
            self.results[name] = row
            self.curves[name] = curves
            self.per_image[name] = per_image
        self._add_statistics()
        labelled = float(self.labelled.compute())
        self.summary = {
            "top1_accuracy": float(self.accuracy.compute()) if labelled > 0 else None,
            "labelled_images": int(labelled),
            "skipped_images": int(self.skipped.compute()),
            "failed": failures,
            "statistics": {
                "compare_to": self.compare_to if self.compare_to in self.results else None,
                "confidence": self.confidence,
                "resamples": self.resamples,
                "seed": self._bootstrap_seed,
            },
        }

    @property
    def _bootstrap_seed(self) -> int:
        seed = self.shared.get("seed")
        return 0 if seed is None else int(seed)

    def _add_statistics(self) -> None:
        """Intervals and paired comparisons from the per-image values (the same on every process: the values
        are gathered and ordered by image index, and the bootstrap is seeded)."""
        reference = self.compare_to if self.compare_to in self.per_image else None
        found = statistics.summarise(
            self.per_image, self.columns, reference, self.confidence, self.resamples, self._bootstrap_seed
        )
        for name, values in found.items():
            self.results[name].update(values)

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
