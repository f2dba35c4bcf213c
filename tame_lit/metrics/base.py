"""The metric interface: every faithfulness metric scores one ``ScoredBatch`` and says how to show itself.

A metric is a torchmetrics ``Metric`` (states reduced exactly across processes) with:

- ``update(batch: ScoredBatch)``: the same call for every metric, whatever it needs of the batch;
- ``compute() -> {key: float}``: flat named numbers, the keys of its ``columns()``;
- ``columns()``: what each key means (title, better up or down, digits, counted in the mean rank or not),
  read by the report, the terminal table, metrics.csv and W&B;
- ``curves() -> {key: Curve}``: optional mean curves, all in one shape;
- ``per_image() -> {"index": [N], key: [N], ...}``: each image's value of the per-image keys (``cat``
  states, so exact under DDP), for confidence intervals and paired comparisons.

Also here: the helpers every perturbation metric needs (the model's probability of the explained class on
many images, in chunks).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any, ClassVar, Protocol, TypeVar

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from tame_lit.registry import Registry

__all__ = [
    "METRICS",
    "Column",
    "Curve",
    "Explains",
    "FaithfulnessMetric",
    "ImageMean",
    "Model",
    "ScoredBatch",
    "class_probability",
    "explain_in_chunks",
    "hashed_seed",
    "probabilities",
]

# images in [0, 1], [N, 3, H, W] -> logits [N, classes] (a tame-lit Backbone is one)
Model = Callable[[Tensor], Tensor]
_Value = TypeVar("_Value")


class Explains(Protocol):
    """What the metrics that explain again (robustness, sanity checks) need of the explainer: its call,
    ``explainer(images, targets) -> maps [N, H, W]`` (a tame-lit ``Explainer`` is one)."""

    def __call__(self, images: Tensor, targets: Tensor | None = None) -> Tensor: ...


def hashed_seed(key: str) -> int:
    """A 63-bit seed from a string naming one random draw (run seed, image index, level, copy, layer): the same in
    every batch, process and run, unlike Python's ``hash`` of a string, which is salted per process."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


def class_probability(logits: Tensor, targets: Tensor) -> Tensor:
    """Softmax probability of each image's target class, in float32: ``[B]``."""
    return logits.float().softmax(dim=1).gather(1, targets[:, None]).squeeze(1)


@torch.no_grad()
def probabilities(model: Model, images: Tensor, targets: Tensor, chunk_size: int = 64) -> Tensor:
    """``class_probability(model(images), targets)`` with at most ``chunk_size`` images per forward pass.

    The perturbation metrics build many perturbed copies of a batch; chunking bounds the memory of the
    forward passes without changing any value (the model is in eval mode: images do not interact).
    """
    return _in_chunks(lambda part, wanted: class_probability(model(part), wanted), images, targets, chunk_size, ())


def explain_in_chunks(explainer: Explains, images: Tensor, targets: Tensor, chunk_size: int = 64) -> Tensor:
    """``explainer(images, targets)`` with at most ``chunk_size`` images per call: ``[N, H, W]`` (explainers treat
    each image on its own, so chunking bounds memory without changing a value)."""
    return _in_chunks(explainer, images, targets, chunk_size, tuple(images.shape[-2:]))


def _in_chunks(
    function: Callable[[Tensor, Tensor], Tensor], images: Tensor, targets: Tensor, chunk_size: int, item: tuple
) -> Tensor:
    """``function(images, targets)`` on at most ``chunk_size`` images at a time, concatenated; float32 ``[0, *item]``
    for no images."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if images.shape[0] != targets.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {targets.shape[0]} targets")
    parts = [
        function(images[start : start + chunk_size], targets[start : start + chunk_size])
        for start in range(0, images.shape[0], chunk_size)
    ]
    return torch.cat(parts) if parts else images.new_zeros(0, *item, dtype=torch.float32)


@dataclass(eq=False)
class ScoredBatch:
    """One batch of explanations, as every metric receives it.

    ``model``: the explained classifier (images in [0, 1] -> logits); ``images`` ``[B, 3, H, W]`` in [0, 1];
    ``maps`` ``[B, H, W]`` (the explanations, at the images' size); ``targets`` ``[B]`` the explained classes;
    ``indices`` ``[B]`` each image's dataset index (per-image values and noise seeds follow it; default
    ``0..B-1``); ``boxes``: per image ``[n, 5]`` rows (class, x0, y0, x1, y1) when the data has boxes;
    ``clean_logits``: the model's logits on the clean images, when the caller already has them (else one
    forward pass, shared by every metric of the batch); ``explainer``: what made the maps, for the metrics
    that explain other images or classes (``explain``).
    """

    model: Model
    images: Tensor
    maps: Tensor
    targets: Tensor
    indices: Tensor | None = None
    boxes: Sequence[Tensor] | None = None
    clean_logits: Tensor | None = field(default=None, repr=False)
    explainer: Explains | None = field(default=None, repr=False)
    # work that several metrics of the batch share (``shared``), e.g. the maps of noisy copies
    _shared: dict[Hashable, Any] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W] in [0, 1], got {tuple(self.images.shape)}")
        batch, size = self.images.shape[0], tuple(self.images.shape[-2:])
        if tuple(self.maps.shape) != (batch, *size):
            raise ValueError(
                f"maps must be [B, H, W] = {(batch, *size)} for images {tuple(self.images.shape)} "
                f"(see tame_lit.maps.upsample), got {tuple(self.maps.shape)}"
            )
        if tuple(self.targets.shape) != (batch,):
            raise ValueError(f"targets must be [B] = [{batch}], got {tuple(self.targets.shape)}")
        if self.indices is None:
            self.indices = torch.arange(batch)
        elif tuple(self.indices.shape) != (batch,):
            raise ValueError(f"indices must be [B] = [{batch}], got {tuple(self.indices.shape)}")
        if self.boxes is not None and len(self.boxes) != batch:
            raise ValueError(f"boxes must hold one tensor per image ({batch}), got {len(self.boxes)}")
        if self.clean_logits is not None and self.clean_logits.shape[0] != batch:
            raise ValueError(
                f"clean_logits must be [B, classes] with B = {batch}, got {tuple(self.clean_logits.shape)}"
            )

    @property
    def size(self) -> int:
        return self.images.shape[0]

    @cached_property
    def logits(self) -> Tensor:
        """The model's logits on the clean images (computed once per batch when not given)."""
        if self.clean_logits is not None:
            return self.clean_logits
        with torch.no_grad():
            return self.model(self.images)

    def explain(self, images: Tensor, targets: Tensor, chunk_size: int = 64) -> Tensor:
        """The explainer's maps ``[N, H, W]`` of ``images`` for ``targets``, ``chunk_size`` images per call
        (explainers treat each image on its own, so chunking changes no value)."""
        if self.explainer is None:
            raise ValueError(
                "this metric explains other images or classes: give ScoredBatch the explainer (explainer=...)"
            )
        return explain_in_chunks(self.explainer, images, targets, chunk_size)

    def shared(self, key: Hashable, compute: Callable[[], _Value]) -> _Value:
        """``compute()``, done once per batch for each ``key``: metrics that need the same work (the same noisy
        copies and their maps) name it by the same key and the second one reads the first one's result."""
        if key not in self._shared:
            self._shared[key] = compute()
        return self._shared[key]

    @cached_property
    def clean_probs(self) -> Tensor:
        """Probability of each target on its clean image, float32 ``[B]``."""
        return class_probability(self.logits, self.targets.to(self.logits.device))

    @cached_property
    def predictions(self) -> Tensor:
        """The model's top-1 class on each clean image ``[B]``."""
        return self.logits.argmax(dim=1)


@dataclass(frozen=True)
class Column:
    """How one result key is shown: ``higher_is_better`` None means not a faithfulness score (not ranked,
    no best value); ``primary`` columns are averaged into the mean rank; ``share``: a proportion of images
    (a hit rate), whose interval is binomial rather than a bootstrap of a mean, with per-image values 0 or
    ``scale`` (100 for a percentage); ``table``: shown in the summary tables (report.md, terminal) as well as
    in metrics.json/csv and W&B."""

    key: str
    title: str
    higher_is_better: bool | None
    digits: int = 3
    primary: bool = False
    share: bool = False
    table: bool = True
    scale: float = 1.0


@dataclass(frozen=True)
class Curve:
    """A mean curve, in the one shape the report, curves.json and W&B read: points ``(x, y)``; ``figure``
    names the plot it is drawn in (several curves can share one, e.g. ROAD's MoRF and LeRF) and ``label``
    its line there (beside the explainer's name); ``style`` is a matplotlib line style; ``summary_key``: the
    result key whose value the legend shows (e.g. the curve's AUC)."""

    figure: str
    title: str
    x_label: str
    y_label: str
    x: list[float]
    y: list[float]
    label: str = ""
    style: str = "-"
    summary_key: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class FaithfulnessMetric(Metric):
    """Base class of the evaluation's metrics (see the module docstring for the interface).

    Subclasses name their per-image keys in ``super().__init__(per_image_keys=...)`` and call
    ``self.record(batch.indices, key=values, ...)`` in ``update``.
    """

    full_state_update: ClassVar[bool] = False
    higher_is_better: ClassVar[bool | None] = None
    # False for an expensive metric that users turn on (``metrics.<name>=true``); the evaluation's default
    default_enabled: ClassVar[bool] = True

    def __init__(self, per_image_keys: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.per_image_keys = tuple(per_image_keys)
        self.add_state("image_index", default=[], dist_reduce_fx="cat")
        for key in self.per_image_keys:
            self.add_state(_state_name(key), default=[], dist_reduce_fx="cat")

    def update(self, batch: ScoredBatch) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        raise NotImplementedError

    def columns(self) -> list[Column]:
        """The keys ``compute`` returns, with how to show them."""
        raise NotImplementedError

    def curves(self) -> dict[str, Curve]:
        """Mean curves over every process (none by default)."""
        return {}

    def settings(self) -> dict[str, Any]:
        """The settings this metric applied where they differ from its options as given (e.g. the step in pixels
        that a number of steps resolved to), for the report; none by default."""
        return {}

    def record(self, indices: Tensor, **values: Tensor) -> None:
        """Keep each image's value of the per-image keys (``[B]`` each, same images as ``indices``)."""
        missing = set(self.per_image_keys) - set(values)
        if missing or set(values) - set(self.per_image_keys):
            raise ValueError(
                f"record() needs exactly the per-image keys {list(self.per_image_keys)}, got {list(values)}"
            )
        device = self.image_index[0].device if self.image_index else torch.device("cpu")
        self.image_index.append(indices.detach().long().to(device))
        for key, value in values.items():
            getattr(self, _state_name(key)).append(value.detach().double().flatten().to(device))

    def synced(self) -> AbstractContextManager[None]:
        """Inside it, the states hold the values of every process (as inside ``compute``), for methods other than
        ``compute`` that read them (``per_image``, ``curves``)."""
        return self.sync_context(
            dist_sync_fn=self.dist_sync_fn,
            should_sync=self._to_sync and not self._is_synced,
            should_unsync=self._should_unsync,
        )

    def per_image(self) -> dict[str, Tensor]:
        """``{"index": [N], key: [N] ...}`` over every process (synchronised like ``compute``)."""
        with self.synced():
            result = {"index": _cat(self.image_index, torch.long)}
            for key in self.per_image_keys:
                result[key] = _cat(getattr(self, _state_name(key)), torch.float64)
        return result


class ImageMean(FaithfulnessMetric):
    """A metric that is the mean of one value per image (``key``, shown as ``title``, direction
    ``higher_is_better``): subclasses compute the values in ``update`` and hand them to ``add``."""

    key: ClassVar[str]
    title: ClassVar[str]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(per_image_keys=(self.key,), **kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def add(self, indices: Tensor, values: Tensor) -> None:
        """Count ``values`` ``[n]`` of the images ``indices`` ``[n]`` in the mean and keep them per image."""
        values = values.double()
        self.total = self.total + values.sum()
        self.count = self.count + values.numel()
        self.record(indices, **{self.key: values})

    def compute(self) -> dict[str, float]:
        """The mean over the images counted; nothing when there was none."""
        return {self.key: float(self.total) / int(self.count)} if int(self.count) else {}

    def columns(self) -> list[Column]:
        return [Column(self.key, self.title, self.higher_is_better)]


# name -> metric class; each metric's file registers itself (``@METRICS.register("name")``)
METRICS: Registry[type[FaithfulnessMetric]] = Registry("metric")


def _state_name(key: str) -> str:
    return "image_" + "".join(char if char.isalnum() else "_" for char in key)


def _cat(values: list[Tensor] | Tensor, dtype: torch.dtype) -> Tensor:
    if isinstance(values, Tensor):  # after a sync, a cat state is one tensor
        return values.to(dtype).cpu()
    return dim_zero_cat(values).to(dtype).cpu() if values else torch.zeros(0, dtype=dtype)
