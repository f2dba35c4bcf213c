"""Sanity checks: does an explanation depend on the model and on the class it explains?

- The model parameter randomisation test (Adebayo et al., NeurIPS 2018): the explainer runs again on a copy of
  the explained network whose layers are re-initialised, from the top down (cascading) or one at a time
  (independent); a map that stays the same cannot be explaining what the network learnt.
- The random-logit test (Sixt et al., ICML 2020): the map of the predicted class against the map of a random
  other class; a map that stays the same does not explain the class.

Similarities are Spearman's rank correlation and SSIM, as in Quantus (``MPRT``, ``RandomLogit``).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.utilities.data import dim_zero_cat

from tame_lit.metrics.base import (
    METRICS,
    Column,
    Curve,
    FaithfulnessMetric,
    ImageMean,
    ScoredBatch,
    explain_in_chunks,
    hashed_seed,
)

__all__ = [
    "MODES",
    "ModelRandomisation",
    "RandomLogit",
    "average_ranks",
    "randomisation_layers",
    "randomise",
    "randomised_copy",
    "rank_correlation",
    "ssim",
]

log = logging.getLogger(__name__)

MODES = ("cascading", "independent")


def average_ranks(maps: Tensor) -> Tensor:
    """``[B, n]`` float64 rank (1..n) of each value of each map ``[B, ...]`` among its map's values, ties given their
    average rank (scipy's ``rankdata``), for the whole batch at once (torchmetrics ranks one column at a time, in a
    Python loop over the tied values: as slow as the Grad-CAM pass it scores)."""
    values = maps.flatten(1)
    count = values.shape[1]
    ordered, order = values.sort(dim=1, stable=True)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    groups = starts.long().cumsum(dim=1) - 1  # each sorted value's run of equal values
    positions = torch.arange(1, count + 1, dtype=torch.float64, device=values.device).expand_as(groups)
    totals = torch.zeros_like(positions).scatter_add_(1, groups, positions)
    sizes = torch.zeros_like(positions).scatter_add_(1, groups, torch.ones_like(positions))
    mean_positions = (totals / sizes.clamp_min(1)).gather(1, groups)
    return torch.empty_like(mean_positions).scatter_(1, order, mean_positions)


def rank_correlation(maps: Tensor, others: Tensor, maps_ranks: Tensor | None = None) -> Tensor:
    """``[B]`` Spearman rank correlation of each pair of maps ``[B, H, W]`` (ties get their average rank, as
    scipy's). Where it is undefined, a constant map, it is 1 for two equal maps and 0 otherwise (scipy: NaN).
    ``maps_ranks``: ``average_ranks(maps)`` when the caller already has them (one map against many). Float64:
    sums over the ranks of 50,176 pixels overflow float32's precision."""
    a, b = maps.flatten(1), others.flatten(1)
    ranks_a = average_ranks(a) if maps_ranks is None else maps_ranks
    ranks_a, ranks_b = ranks_a - ranks_a.mean(dim=1, keepdim=True), average_ranks(b)
    ranks_b = ranks_b - ranks_b.mean(dim=1, keepdim=True)
    correlation = (ranks_a * ranks_b).sum(dim=1) / (ranks_a.norm(dim=1) * ranks_b.norm(dim=1)).clamp_min(1e-300)
    constant = (a == a[:, :1]).all(dim=1) | (b == b[:, :1]).all(dim=1)
    equal = (a == b).all(dim=1).double()
    return torch.where(constant, equal, correlation)


def ssim(maps: Tensor, others: Tensor, window: int = 7, data_range: float = 1.0) -> Tensor:
    """``[B]`` mean structural similarity of each pair of maps ``[B, H, W]`` in [0, 1]: scikit-image's
    ``structural_similarity`` defaults (a uniform ``window`` x ``window`` window over the valid pixels, sample
    covariances, K1 0.01, K2 0.03), which Quantus calls. Written here because torchmetrics' SSIM uses population
    covariances (off by far more than rounding for dissimilar maps) and scikit-image runs one image at a time."""
    window = min(window, *maps.shape[-2:])
    window -= 1 - window % 2  # odd, as scikit-image requires
    a, b = maps[:, None].double(), others[:, None].double()
    stacked = torch.cat([a, b, a * a, b * b, a * b])  # the window's means: one box filter, rows then columns
    means = F.avg_pool2d(F.avg_pool2d(stacked, (window, 1), stride=1), (1, window), stride=1).split(a.shape[0])
    mean_a, mean_b, mean_aa, mean_bb, mean_ab = means
    correction = window * window / (window * window - 1)  # sample covariances
    var_a = (mean_aa - mean_a**2) * correction
    var_b = (mean_bb - mean_b**2) * correction
    cov = (mean_ab - mean_a * mean_b) * correction
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    index = ((2 * mean_a * mean_b + c1) * (2 * cov + c2)) / ((mean_a**2 + mean_b**2 + c1) * (var_a + var_b + c2))
    return index.mean(dim=(1, 2, 3))


def randomisation_layers(model: nn.Module) -> list[str]:
    """The units the randomisation test re-initialises, in forward (registration) order: the network's top-level
    modules that hold parameters, each ``nn.Sequential``/``nn.ModuleList`` among them split into its items
    (EfficientNet's ``blocks.0`` ... ``blocks.6``, a ViT's ``blocks.0`` ... ``blocks.11``). Parameters the
    network holds itself (a ViT's position embedding and class token) belong to no unit and stay trained."""
    units = []
    for name, child in model.named_children():
        parts = child.named_children() if isinstance(child, (nn.Sequential, nn.ModuleList)) else [("", child)]
        for part, module in parts:
            if any(True for _ in module.parameters()):
                units.append(f"{name}.{part}" if part else name)
    return units


@torch.no_grad()
def randomise(module: nn.Module, seed: int) -> None:
    """Re-initialise ``module`` in place, reproducibly: each submodule with ``reset_parameters`` (convolutions,
    linear and norm layers) takes its own initialisation; a parameter no such submodule owns (e.g. a layer
    scale) is re-drawn from a normal with its own mean and standard deviation. The global random state is
    left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for submodule in module.modules():
            if hasattr(submodule, "reset_parameters"):
                submodule.reset_parameters()
            else:
                for parameter in submodule.parameters(recurse=False):
                    std = parameter.float().std().item() if parameter.numel() > 1 else 0.0
                    mean = parameter.float().mean().item()
                    parameter.copy_(torch.randn_like(parameter.float()).mul_(std).add_(mean))


def randomised_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` to randomise, with no tie to the original: a module compiled in place
    (``nn.Module.compile``) keeps a function bound to the *original* module, so the copy runs eagerly."""
    duplicate = copy.deepcopy(model)
    for module in duplicate.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
    return duplicate


@METRICS.register("randomisation")
class ModelRandomisation(FaithfulnessMetric):
    """Model parameter randomisation: per randomised layer, how similar the map stays (lower: it depends more on
    the model's parameters).

    ``mode``: ``cascading`` re-initialises the layers from the top down, cumulatively, and scores after each;
    ``independent`` re-initialises one layer at a time, the rest trained. ``layers``: the units, by module name
    of the backbone's network (default ``randomisation_layers``: the top-level modules, blocks split). The
    explainer runs on a randomised copy (``randomised_copy``; the user's model never changes) with the same
    targets; a trained head reads the randomised backbone's features (it is not retrained). Keys:
    ``randomisation`` and ``randomisation_ssim`` (per image the mean over layers of the rank correlation and SSIM
    with the trained model's map), ``randomisation@<layer>`` and ``randomisation_ssim@<layer>``, and
    ``randomisation_passed``: the share of layers at which the map depends on the model, i.e. its mean rank
    correlation is below that of a second run on the trained model (1 for a deterministic method) by more than
    ``margin`` (a model-blind method passes at none: its second run agrees with the randomised one).
    Cost: one explainer pass per layer and one more per batch, and memory for one copy of the backbone (its
    size is in the report's settings).
    """

    higher_is_better = False
    default_enabled = False

    def __init__(
        self,
        mode: str = "cascading",
        layers: Sequence[str] | None = None,
        margin: float = 0.1,
        seed: int = 0,
        chunk_size: int = 64,
        **kwargs: Any,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"randomisation mode must be one of {MODES}, got {mode!r}")
        if layers is not None and (isinstance(layers, str) or not list(layers)):
            raise ValueError(f"randomisation layers must be a non-empty list of module names, got {layers!r}")
        if not 0.0 <= float(margin) < 2.0:
            raise ValueError(f"randomisation margin must be in [0, 2) (a difference of correlations), got {margin}")
        if int(chunk_size) < 1:
            raise ValueError(f"randomisation chunk_size must be >= 1, got {chunk_size}")
        super().__init__(per_image_keys=("randomisation", "randomisation_ssim"), **kwargs)
        self.mode, self.margin, self.seed, self.chunk_size = mode, float(margin), int(seed), int(chunk_size)
        self.layers: list[str] | None = None if layers is None else [str(layer) for layer in layers]
        self.copy_megabytes: float | None = None
        self.add_state("correlations", default=[], dist_reduce_fx="cat")  # [images, layers] per batch
        self.add_state("similarities", default=[], dist_reduce_fx="cat")
        self.add_state("reruns", default=[], dist_reduce_fx="cat")  # [images, 2]: rank correlation, SSIM
        self._skipped_reason: str | None = None

    def update(self, batch: ScoredBatch) -> None:
        explainer = batch.explainer
        if explainer is None:
            batch.explain(batch.images, batch.targets)  # raises, saying what is missing
        if not hasattr(explainer, "on_backbone"):
            if self._skipped_reason is None:
                self._skipped_reason = (
                    f"{type(explainer).__name__} does not run on a backbone in this process (an exported program or "
                    "graph cannot run on a randomised copy): no randomisation test"
                )
                log.warning(self._skipped_reason)
            return
        trained: nn.Module = explainer.backbone
        layers = self._resolve_layers(trained)
        targets, indices = batch.targets, batch.indices
        rerun = batch.explain(batch.images, targets, self.chunk_size)
        correlations, similarities = [], []
        reference = average_ranks(batch.maps)  # ranked once, compared with every layer's maps
        top_down = list(reversed(layers))
        model, randomised = None, explainer
        for unit in top_down:
            if model is None or self.mode == "independent":  # cascading: one copy, randomised further each step
                model = randomised_copy(trained)
                randomised = explainer.on_backbone(model)
            randomise(model.get_submodule(f"model.{unit}"), hashed_seed(f"randomisation/{self.seed}/{unit}"))
            maps = explain_in_chunks(randomised, batch.images, targets, self.chunk_size)
            correlations.append(rank_correlation(batch.maps, maps, reference))
            similarities.append(ssim(batch.maps, maps))
        per_layer = torch.stack(correlations, dim=1).to(self.device)
        per_layer_ssim = torch.stack(similarities, dim=1).to(self.device)
        self.correlations.append(per_layer)
        self.similarities.append(per_layer_ssim)
        rerun_similarity = torch.stack([rank_correlation(batch.maps, rerun, reference), ssim(batch.maps, rerun)], dim=1)
        self.reruns.append(rerun_similarity.to(self.device))
        self.record(indices, randomisation=per_layer.mean(dim=1), randomisation_ssim=per_layer_ssim.mean(dim=1))

    def _resolve_layers(self, trained: nn.Module) -> list[str]:
        network = trained.get_submodule("model")
        if self.layers is None:
            self.layers = randomisation_layers(network)
        else:
            names = dict(network.named_modules())
            unknown = [layer for layer in self.layers if layer not in names]
            if unknown:
                raise ValueError(
                    f"randomisation layers {unknown} are not modules of the network; its units are "
                    f"{randomisation_layers(network)}"
                )
        if self.copy_megabytes is None:
            tensors = [*trained.parameters(), *trained.buffers()]
            self.copy_megabytes = sum(t.numel() * t.element_size() for t in tensors) / 2**20
        return self.layers

    def _order(self) -> list[str]:
        return list(reversed(self.layers or []))

    def _means(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """Per layer, the mean rank correlation and SSIM, and the rerun's two; None before any image. A list state
        is one tensor after a sync across processes."""
        if isinstance(self.correlations, list) and not self.correlations:
            return None
        correlations, similarities, reruns = (
            dim_zero_cat(state).double() for state in (self.correlations, self.similarities, self.reruns)
        )
        return correlations.mean(dim=0), similarities.mean(dim=0), reruns.mean(dim=0)

    def compute(self) -> dict[str, float]:
        means = self._means()
        if means is None:
            return {}
        correlations, similarities, rerun = means
        order = self._order() or [f"layer{i}" for i in range(len(correlations))]
        result = {
            "randomisation": float(correlations.mean()),
            "randomisation_ssim": float(similarities.mean()),
            "randomisation_rerun": float(rerun[0]),
            "randomisation_passed": float((correlations < rerun[0] - self.margin).double().mean()),
        }
        for i, layer in enumerate(order):
            result[f"randomisation@{layer}"] = float(correlations[i])
            result[f"randomisation_ssim@{layer}"] = float(similarities[i])
        return result

    def columns(self) -> list[Column]:
        columns = [
            Column("randomisation", "Randomisation ρ ↓", False),
            Column("randomisation_passed", "Model-dependent layers ↑", True, 2),
            Column("randomisation_ssim", "Randomisation SSIM ↓", False, table=False),
            Column("randomisation_rerun", "Rerun ρ", None, table=False),
        ]
        for layer in self._order():
            columns.append(Column(f"randomisation@{layer}", f"ρ after {layer}", False, table=False))
            columns.append(Column(f"randomisation_ssim@{layer}", f"SSIM after {layer}", False, table=False))
        return columns

    def curves(self) -> dict[str, Curve]:
        with self.synced():
            means = self._means()
        if means is None:
            return {}
        correlations, similarities, rerun = means
        # step 0: nothing randomised (a second run on the trained model), then one more layer (cascading) or
        # the next layer alone (independent) per step, from the top
        steps = [float(i) for i in range(len(correlations) + 1)]
        x_label = "layers randomised, from the top" if self.mode == "cascading" else "layer randomised, from the top"
        return {
            f"randomisation_{name}": Curve(
                figure=f"randomisation_{name}",
                title=f"Randomisation ({self.mode}): {title} with the trained map",
                x_label=x_label,
                y_label=title,
                x=steps,
                y=[float(start), *(float(v) for v in values)],
                summary_key="randomisation" if name == "rank" else "randomisation_ssim",
            )
            for name, title, start, values in (
                ("rank", "rank correlation", rerun[0], correlations),
                ("ssim", "SSIM", rerun[1], similarities),
            )
        }

    def settings(self) -> dict[str, Any]:
        if self.layers is None:
            return {}
        return {
            "layers_top_down": self._order(),
            "copy_megabytes": None if self.copy_megabytes is None else round(self.copy_megabytes, 1),
        }


@METRICS.register("random_logit")
class RandomLogit(ImageMean):
    """Random-logit test: SSIM between the map of the explained class and the map of a random other class (lower:
    the map depends more on the class). The other class is drawn per image from ``seed`` and the image's dataset
    index, so it does not depend on the batch. Cost: one explainer pass per image."""

    higher_is_better = False
    default_enabled = False
    key = "random_logit"
    title = "Random logit SSIM ↓"

    def __init__(self, seed: int = 0, chunk_size: int = 64, **kwargs: Any) -> None:
        if int(chunk_size) < 1:
            raise ValueError(f"random_logit chunk_size must be >= 1, got {chunk_size}")
        super().__init__(**kwargs)
        self.seed, self.chunk_size = int(seed), int(chunk_size)

    def update(self, batch: ScoredBatch) -> None:
        classes = batch.logits.shape[1]
        if classes < 2:
            raise ValueError("random_logit needs a model with at least 2 classes")
        pairs = zip(batch.indices.tolist(), batch.targets.tolist(), strict=True)
        others = torch.tensor(
            [self.other_class(index, target, classes) for index, target in pairs], device=batch.targets.device
        )
        maps = batch.explain(batch.images, others, self.chunk_size)
        self.add(batch.indices, ssim(batch.maps, maps))

    def other_class(self, index: int, target: int, classes: int) -> int:
        """A class other than ``target``, uniform over the other ``classes - 1``, drawn from the seed and index."""
        generator = torch.Generator().manual_seed(hashed_seed(f"random_logit/{self.seed}/{index}"))
        drawn = int(torch.randint(classes - 1, (1,), generator=generator))
        return drawn + int(drawn >= target)
