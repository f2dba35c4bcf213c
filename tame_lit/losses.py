"""TAME's masking objective: cross-entropy on the masked image plus area and smoothness of the masks, and
optionally cross-entropy on the image masked by each map's top pixels only, as AD/IC@p masks it, the
class probability left once those top pixels are deleted, as the deletion curve deletes them, and the class
probability missing once only they are put back into a blurred copy, as the insertion curve inserts them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from tame_lit.maps import keep_top, top_count, top_set
from tame_lit.metrics.ad_ic import percent

__all__ = [
    "KEPT_GRADIENTS",
    "MaskingLoss",
    "area_loss",
    "top_fraction_indicator",
    "top_fraction_mask",
    "variation_loss",
]

KEPT_GRADIENTS = ("straight_through", "hard")


def area_loss(masks: Tensor, exponent: float = 0.3, offset: float = 0.0005) -> Tensor:
    """mean((A + offset) ** exponent) over every element; the offset keeps the gradient finite at 0."""
    return ((masks + offset) ** exponent).mean()


def variation_loss(masks: Tensor, border: float = 0.3) -> Tensor:
    """[sum of squared neighbour differences + border * squared border values] / (2 * batch size).

    ``masks`` is ``[B, M, h, w]``; sums run over all M maps of every image, and the border term counts
    the four edges (corners twice), as the original code does.
    """
    dy = (masks[..., 1:, :] - masks[..., :-1, :]).pow(2).sum()
    dx = (masks[..., :, 1:] - masks[..., :, :-1]).pow(2).sum()
    edges = (
        masks[..., 0, :].pow(2).sum()
        + masks[..., -1, :].pow(2).sum()
        + masks[..., :, 0].pow(2).sum()
        + masks[..., :, -1].pow(2).sum()
    )
    return (dx + dy + border * edges) / (2 * masks.shape[0])


def top_fraction_mask(
    maps: Tensor, fraction: float, gradient: str = "straight_through", temperature: float = 0.05
) -> Tensor:
    """The mask AD/IC@``fraction`` applies, for training: ``keep_top(maps, fraction)`` in float32 (each
    ``[B, H, W]`` map's top ceil(fraction * H * W) pixels at their soft values, the rest 0).

    ``gradient="hard"``: the gradient reaches only the kept pixels (through their soft values).
    ``"straight_through"``: the forward values are the same, and the gradient is that of
    ``maps * sigmoid((maps - q) / temperature)``, with q each map's smallest kept value (its (1 - fraction)
    quantile, detached), so pixels just outside the kept set also learn whether they should enter it.
    A fraction that keeps every pixel returns ``maps`` itself (plain gradient) in both modes.
    """
    if gradient not in KEPT_GRADIENTS:
        raise ValueError(f"gradient must be one of {KEPT_GRADIENTS}, got {gradient!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    maps = maps.float()  # threshold and sigmoid in float32, also under bf16-mixed autocast
    if gradient == "hard":
        return keep_top(maps, fraction)
    if top_count(maps[0].numel(), fraction) >= maps[0].numel():
        return maps
    with torch.no_grad():
        hard = keep_top(maps, fraction)
    soft = maps * _relaxed_top(maps, fraction, temperature)
    return hard + (soft - soft.detach())  # forward exactly keep_top's values (soft - soft.detach() is 0)


def top_fraction_indicator(maps: Tensor, fraction: float, temperature: float = 0.05) -> Tensor:
    """Which pixels the deletion curve has deleted once ``fraction`` of them are gone, for training: 1 on each
    ``[B, H, W]`` map's top ceil(fraction * H * W) pixels (``keep_top``'s, ties broken as it breaks them), 0
    elsewhere, in float32. The gradient is that of ``sigmoid((maps - q) / temperature)`` (q as in
    ``top_fraction_mask``): a 0/1 set has none, and this one tells pixels near the threshold whether to enter it.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    maps = maps.float()
    with torch.no_grad():
        hard = top_set(maps, fraction).float()
    soft = _relaxed_top(maps, fraction, temperature)
    return hard + (soft - soft.detach())


def _label_probability(logits: Tensor, labels: Tensor) -> Tensor:
    """Each image's softmax probability of its label, in float32: what the deletion and insertion curves plot."""
    return logits.float().softmax(dim=1).gather(1, labels.unsqueeze(1)).squeeze(1)


def _relaxed_top(maps: Tensor, fraction: float, temperature: float) -> Tensor:
    """sigmoid((maps - q) / temperature), q each map's count-th largest value (detached): the smooth stand-in
    for "among the top ``fraction``" whose gradient the straight-through masks use."""
    flat = maps.detach().flatten(1)
    count = top_count(flat.shape[1], fraction)
    threshold = flat.kthvalue(flat.shape[1] - count + 1, dim=1).values  # the count-th largest value
    return torch.sigmoid((maps - threshold.view(-1, *([1] * (maps.dim() - 1)))) / temperature)


def _fractions(key: str, values: Sequence[object], valid: str, within: Callable[[float], bool]) -> tuple[float, ...]:
    """``values`` as a tuple of floats, each a number ``within`` its range and none twice (as its term's name,
    in percent, would be), or a ValueError naming ``key``, the value at fault and the ``valid`` range."""
    values = tuple(values)
    for fraction in values:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not within(fraction):
            raise ValueError(f"{key} must list fractions of pixels in {valid}, got {fraction!r} in {list(values)}")
    fractions = tuple(float(f) for f in values)
    if len({percent(f) for f in fractions}) != len(fractions):
        raise ValueError(f"{key} lists a fraction twice: {list(fractions)}")
    return fractions


@dataclass
class MaskingLoss:
    """L = ce * CE(logits of masked image, labels) + area * Area(A) + variation * Var(A)
    [+ kept_ce * CE(logits of the image masked by each map's top p pixels, labels), for each p in ``kept``].

    ``selection`` picks the maps A the regularisers see: ``"batch"`` gives every image's maps of all the
    labels in the batch (B x B, as the original TAME code and T-TAME's ``masking="random"``),
    ``"diagonal"`` each image's map of its own label (B x 1).

    ``kept``: fractions p of pixels in (0, 1]; each adds a term ``ce@<p in percent>`` (``ce@15``), the
    cross-entropy of the image masked as AD/IC@p masks it (``top_fraction_mask``: the map's top p pixels at
    their soft values, the rest black), weighted by ``kept_ce`` (default 1.5, the weight of ``ce``). Each
    costs one more backbone pass (and its activations) per step. ``kept_gradient`` and ``kept_temperature``
    choose how the gradient crosses the top-p threshold (``top_fraction_mask``). Empty: TAME's objective.

    ``deleted``: fractions p of pixels in (0, 1); each adds a term ``del@<p in percent>``, ``deleted_weight`` x
    the mean softmax probability of the label once each map's top p pixels are deleted (set to black, as the
    deletion curve deletes them, in the order of the upsampled logits; ``deleted_mask``). The objective the
    deletion AUC tests, which the soft mask never sees: what a map ranks first must carry the class. One
    backbone pass each.

    ``inserted``: fractions p of pixels in (0, 1); each adds a term ``ins@<p in percent>``, ``inserted_weight`` x
    (1 - the mean softmax probability of the label) on the blurred image with each map's top p pixels put back
    (as the insertion curve inserts them, from its blurred start ``metrics.deletion.blurred``, in the same order
    as ``deleted``; ``inserted_mask``). What the insertion AUC tests: the first pixels a map ranks must bring
    the class back on their own. One backbone pass each.
    """

    ce: float = 1.5
    area: float = 2.0
    variation: float = 0.01
    area_exponent: float = 0.3
    border: float = 0.3
    selection: str = "batch"
    kept: tuple[float, ...] = ()  # a tuple, not Sequence: OmegaConf's structured configs refuse Sequence
    kept_ce: float = 1.5
    kept_gradient: str = "straight_through"
    kept_temperature: float = 0.05
    deleted: tuple[float, ...] = ()
    deleted_weight: float = 1.0
    inserted: tuple[float, ...] = ()
    inserted_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.selection not in ("batch", "diagonal"):
            raise ValueError(f"loss.selection must be 'batch' or 'diagonal', got {self.selection!r}")
        self.kept = _fractions("loss.kept", self.kept, "(0, 1]", lambda f: 0.0 < f <= 1.0)
        self.deleted = _fractions(
            "loss.deleted", self.deleted, "(0, 1) (deleting all leaves a black image)", lambda f: 0.0 < f < 1.0
        )
        self.inserted = _fractions(
            "loss.inserted", self.inserted, "(0, 1) (inserting all gives the image back)", lambda f: 0.0 < f < 1.0
        )
        if self.kept_gradient not in KEPT_GRADIENTS:
            raise ValueError(f"loss.kept_gradient must be one of {KEPT_GRADIENTS}, got {self.kept_gradient!r}")
        if not self.kept_temperature > 0:
            raise ValueError(f"loss.kept_temperature must be > 0, got {self.kept_temperature}")

    def kept_names(self) -> list[str]:
        """The terms' names, ``ce@<percent>`` for each fraction of ``kept`` (``ce@15``, ``ce@2.5``)."""
        return [f"ce@{percent(f)}" for f in self.kept]

    def deleted_names(self) -> list[str]:
        """The terms' names, ``del@<percent>`` for each fraction of ``deleted`` (``del@10``)."""
        return [f"del@{percent(f)}" for f in self.deleted]

    def inserted_names(self) -> list[str]:
        """The terms' names, ``ins@<percent>`` for each fraction of ``inserted`` (``ins@15``)."""
        return [f"ins@{percent(f)}" for f in self.inserted]

    def kept_mask(self, own: Tensor, fraction: float) -> Tensor:
        """The mask of the ``ce@<fraction>`` term from each image's upsampled map ``own`` [B, H, W]."""
        return top_fraction_mask(own, fraction, self.kept_gradient, self.kept_temperature)

    def deleted_mask(self, order: Tensor, fraction: float) -> Tensor:
        """What multiplies the image in the ``del@<fraction>`` term: 0 on each map's top ``fraction``, 1 elsewhere.

        ``order`` [B, H, W]: each image's upsampled logits of its label, min-max to [0, 1]. They rank pixels as
        the head's explanations do, and unlike the sigmoid mask they do not saturate, so pixels near the
        threshold get a gradient (at ``kept_temperature`` on that [0, 1] scale)."""
        return 1 - top_fraction_indicator(order, fraction, self.kept_temperature)

    def inserted_mask(self, order: Tensor, fraction: float) -> Tensor:
        """Where the ``ins@<fraction>`` term's image is the original: 1 on each map's top ``fraction`` (ranked by
        ``order`` as in ``deleted_mask``, with the same relaxed gradient), 0 where it stays blurred."""
        return top_fraction_indicator(order, fraction, self.kept_temperature)

    def regularised_maps(self, masks: Tensor, label_columns: Tensor, batch_columns: Tensor | None = None) -> Tensor:
        """``masks`` [B, K, h, w] (sigmoid maps of K classes); ``label_columns`` [B] each label's column;
        ``batch_columns`` the columns of every label of the batch that ``selection="batch"`` regularises each
        image's maps of (default ``label_columns``; under DDP those of all processes' images, in any order)."""
        if self.selection == "batch":
            return masks[:, label_columns if batch_columns is None else batch_columns]
        return masks[torch.arange(masks.shape[0], device=masks.device), label_columns].unsqueeze(1)

    def __call__(
        self,
        masked_logits: Tensor,
        labels: Tensor,
        masks: Tensor,
        label_columns: Tensor,
        kept_logits: Sequence[Tensor] = (),
        deleted_logits: Sequence[Tensor] = (),
        batch_columns: Tensor | None = None,
        inserted_logits: Sequence[Tensor] = (),
    ) -> dict[str, Tensor]:
        """``kept_logits`` / ``deleted_logits``: the logits of the image times ``kept_mask`` / ``deleted_mask`` at
        each fraction of ``kept`` / ``deleted``; ``inserted_logits``: those of the blurred image with the pixels of
        ``inserted_mask`` put back, at each fraction of ``inserted``; ``batch_columns``: see
        ``regularised_maps``."""
        if len(kept_logits) != len(self.kept):
            raise ValueError(f"loss.kept={list(self.kept)} needs {len(self.kept)} kept logits, got {len(kept_logits)}")
        if len(deleted_logits) != len(self.deleted):
            raise ValueError(
                f"loss.deleted={list(self.deleted)} needs {len(self.deleted)} deleted logits, got {len(deleted_logits)}"
            )
        if len(inserted_logits) != len(self.inserted):
            raise ValueError(
                f"loss.inserted={list(self.inserted)} needs {len(self.inserted)} inserted logits, "
                f"got {len(inserted_logits)}"
            )
        regularised = self.regularised_maps(masks, label_columns, batch_columns)
        terms = {
            "ce": self.ce * F.cross_entropy(masked_logits.float(), labels),
            "area": self.area * area_loss(regularised, self.area_exponent),
            "variation": self.variation * variation_loss(regularised, self.border),
        }
        terms["loss"] = terms["ce"] + terms["area"] + terms["variation"]
        for name, logits in zip(self.kept_names(), kept_logits, strict=True):
            terms[name] = self.kept_ce * F.cross_entropy(logits.float(), labels)
            terms["loss"] = terms["loss"] + terms[name]
        for name, logits in zip(self.deleted_names(), deleted_logits, strict=True):
            terms[name] = self.deleted_weight * _label_probability(logits, labels).mean()
            terms["loss"] = terms["loss"] + terms[name]
        for name, logits in zip(self.inserted_names(), inserted_logits, strict=True):
            terms[name] = self.inserted_weight * (1 - _label_probability(logits, labels)).mean()
            terms["loss"] = terms["loss"] + terms[name]
        return terms
