"""How sure an evaluation is: confidence intervals and paired comparisons from per-image metric values.

Every metric keeps each image's value (``FaithfulnessMetric.per_image``), so the evaluation can put an
interval on every number and compare two explainers on the same images:

- a mean (AD, deletion AUC, ...): the bias-corrected and accelerated (BCa) bootstrap over images
  (``scipy.stats.bootstrap``), seeded, so a rerun or a run on more processes gives the same interval;
- a share (a 0/1 outcome per image: IC, the pointing game): the Wilson score interval
  (``scipy.stats.binomtest``), which stays inside [0, 1] and is right near 0 % and 100 %;
- against a reference explainer, on the images both scored: the mean per-image difference with its BCa
  bootstrap interval, and a paired test: Wilcoxon's signed-rank test, or the exact McNemar test when both
  are shares. The outcome is a *win* (+1) or a *loss* (-1) when both agree: the difference's interval lies
  wholly on the better or the worse side of zero, and the test's p-value is below 1 - confidence; else a *tie*
  (0). (On few images a BCa interval can exclude zero while the rank test does not reject: that is a tie.) No
  correction for the many comparisons of a table is applied: read single wins with a p-value near 0.05 with
  care.

``summarise`` turns an evaluation's per-image values into flat result keys (``<key>_ci_low``,
``<key>_vs_<reference>``, ...) beside the metric values, for metrics.json/csv, the report and the loggers.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from scipy import stats

__all__ = [
    "Comparison",
    "check_settings",
    "comparison_keys",
    "interval_keys",
    "mean_interval",
    "paired_comparison",
    "share_interval",
    "summarise",
]


class ColumnLike(Protocol):
    """What ``summarise`` reads of a result column (``tame_lit.metrics.Column``)."""

    key: str
    higher_is_better: bool | None
    share: bool
    scale: float


def mean_interval(values: np.ndarray, confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple:
    """``(low, high)``: the BCa bootstrap interval of the mean of ``values`` (one per image); a point interval
    when all values are equal, NaNs below two values."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        return math.nan, math.nan
    if np.ptp(values) == 0:
        return float(values[0]), float(values[0])
    for method in ("BCa", "percentile"):  # BCa can be undefined with very few distinct values
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=stats.DegenerateDataWarning)
            warnings.simplefilter("ignore", category=RuntimeWarning)
            result = stats.bootstrap(
                (values,), np.mean, n_resamples=resamples, confidence_level=confidence, method=method,
                rng=np.random.default_rng(seed), vectorized=True,
            ).confidence_interval  # fmt: skip
        if math.isfinite(result.low) and math.isfinite(result.high):
            return float(result.low), float(result.high)
    return math.nan, math.nan


def share_interval(values: np.ndarray, confidence: float = 0.95, scale: float = 1.0) -> tuple:
    """``(low, high)``: the Wilson score interval of the share of images whose value is ``scale`` (the others
    are 0), in the values' units (``scale`` 100 for percent)."""
    successes, total = _successes(values, scale)
    if total == 0:
        return math.nan, math.nan
    interval = stats.binomtest(successes, total).proportion_ci(confidence_level=confidence, method="wilson")
    return float(interval.low) * scale, float(interval.high) * scale


@dataclass(frozen=True)
class Comparison:
    """An explainer against the reference on the same ``images``: ``difference`` = mean(explainer - reference)
    with its interval ``[low, high]``, the paired test's ``p_value``, and ``outcome`` +1 win / 0 tie / -1 loss
    (interval off zero and p below 1 - confidence; which side is better comes from the metric)."""

    difference: float
    low: float
    high: float
    p_value: float
    outcome: int
    images: int


def paired_comparison(
    values: np.ndarray, reference: np.ndarray, higher_is_better: bool, share: bool = False, scale: float = 1.0,
    confidence: float = 0.95, resamples: int = 2000, seed: int = 0,
) -> Comparison:  # fmt: skip
    """Compare per-image ``values`` with ``reference`` on the same images (same order). ``share``: both are
    0/``scale`` outcomes, tested with the exact McNemar test; otherwise with Wilcoxon's signed-rank test."""
    values, reference = np.asarray(values, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if values.shape != reference.shape:
        raise ValueError(f"paired values must have one value per image each, got {values.shape} and {reference.shape}")
    differences = values - reference
    low, high = mean_interval(differences, confidence, resamples, seed)
    if share:
        p_value = _mcnemar(values, reference, scale)
    elif differences.size == 0 or not np.any(differences):
        p_value = 1.0
    else:
        p_value = float(stats.wilcoxon(differences, zero_method="zsplit").pvalue)
    outcome = 0
    if math.isfinite(low) and (low > 0 or high < 0) and p_value < 1.0 - confidence:
        outcome = 1 if (low > 0) == higher_is_better else -1
    difference = float(differences.mean()) if differences.size else math.nan
    return Comparison(difference, low, high, p_value, outcome, int(differences.size))


def interval_keys(key: str) -> tuple[str, str]:
    """The result keys of ``key``'s interval."""
    return f"{key}_ci_low", f"{key}_ci_high"


def comparison_keys(key: str, reference: str) -> dict[str, str]:
    """The result keys of ``key``'s comparison with ``reference``, by ``Comparison`` field."""
    base = f"{key}_vs_{reference}"
    return {
        "difference": base,
        "low": f"{base}_ci_low",
        "high": f"{base}_ci_high",
        "p_value": f"{base}_p",
        "outcome": f"{base}_outcome",
    }


def summarise(
    per_image: Mapping[str, Mapping[str, Mapping[str, torch.Tensor]]],
    columns: Sequence[ColumnLike],
    compare_to: str | None = None,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Intervals and comparisons of every scored column with per-image values.

    ``per_image``: ``{explainer: {metric: {"index": [N], key: [N], ...}}}`` (what ``EvaluationModule`` keeps);
    values are ordered by image index first, so the result does not depend on how images were split across
    processes. Returns ``{explainer: {result key: value}}`` with the ``interval_keys`` of each column, and for
    every explainer but ``compare_to`` the ``comparison_keys`` on the images both scored.
    """
    check_settings(confidence, resamples)
    values = {name: _by_key(metrics) for name, metrics in per_image.items()}
    scored = [column for column in columns if column.higher_is_better is not None]
    result: dict[str, dict[str, float]] = {name: {} for name in per_image}
    for name, keyed in values.items():
        for column in scored:
            if column.key not in keyed:
                continue
            _, column_values = keyed[column.key]
            binary = column.share and _is_binary(column_values, column.scale)
            low, high = (
                share_interval(column_values, confidence, column.scale)
                if binary
                else mean_interval(column_values, confidence, resamples, seed)
            )
            if math.isfinite(low):
                result[name].update(zip(interval_keys(column.key), (low, high), strict=True))
    if compare_to is None or compare_to not in values:
        return result
    reference = values[compare_to]
    for name, keyed in values.items():
        if name == compare_to:
            continue
        for column in scored:
            if column.key not in keyed or column.key not in reference:
                continue
            (index, column_values), (reference_index, reference_values) = keyed[column.key], reference[column.key]
            _, mine, theirs = np.intersect1d(index, reference_index, assume_unique=True, return_indices=True)
            if mine.size < 2:
                continue
            both = column_values[mine], reference_values[theirs]
            binary = column.share and all(_is_binary(v, column.scale) for v in both)
            comparison = paired_comparison(
                *both, column.higher_is_better, binary, column.scale, confidence, resamples, seed
            )
            keys = comparison_keys(column.key, compare_to)
            result[name].update({keys[field]: float(getattr(comparison, field)) for field in keys})
    return result


def check_settings(confidence: float, resamples: int) -> None:
    """Refuse settings that would give no usable interval, naming the setting and what is valid."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95; got {confidence}")
    if resamples < 100:
        raise ValueError(f"resamples must be >= 100 for a stable bootstrap interval, got {resamples}")


def _by_key(metrics: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{key: (indices, values)}`` sorted by image index, over all of an explainer's metrics."""
    keyed: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for recorded in metrics.values():
        index = recorded["index"].cpu().numpy()
        order = np.argsort(index, kind="stable")
        for key, value in recorded.items():
            if key != "index":
                keyed[key] = (index[order], value.double().cpu().numpy()[order])
    return keyed


def _is_binary(values: np.ndarray, scale: float) -> bool:
    return bool(np.all((values == 0) | (values == scale)))


def _successes(values: np.ndarray, scale: float) -> tuple[int, int]:
    values = np.asarray(values, dtype=np.float64)
    if not _is_binary(values, scale):
        raise ValueError(f"a share needs per-image values of 0 or {scale}; got {np.unique(values)[:5]} ...")
    return int(np.sum(values == scale)), int(values.size)


def _mcnemar(values: np.ndarray, reference: np.ndarray, scale: float) -> float:
    """Exact McNemar test: of the images where exactly one of the two succeeds, is it either one equally often?"""
    mine, theirs = values == scale, reference == scale
    only_mine, only_theirs = int(np.sum(mine & ~theirs)), int(np.sum(~mine & theirs))
    if only_mine + only_theirs == 0:
        return 1.0
    return float(stats.binomtest(only_mine, only_mine + only_theirs, 0.5).pvalue)
