"""Faithfulness metrics: one file per metric over ``base.py``'s interface, registered here by name.

A new metric is a ``FaithfulnessMetric`` subclass in its own file (``update(batch: ScoredBatch)``,
``compute() -> {key: float}``, ``columns()``, optionally ``curves()`` and per-image values), decorated with
``@METRICS.register("name")``, and one import line here; ``evaluate.py`` then runs it (options:
``metrics.<name>.<option>=...``) and every report shows it.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from tame_lit.metrics.ad_ic import AverageDropIncrease, masked_probability, percent
from tame_lit.metrics.base import (
    METRICS,
    Column,
    Curve,
    Explains,
    FaithfulnessMetric,
    Model,
    ScoredBatch,
    class_probability,
    explain_in_chunks,
    hashed_seed,
    probabilities,
)
from tame_lit.metrics.complexity import Complexity
from tame_lit.metrics.deletion import DeletionInsertion
from tame_lit.metrics.imputation import linear_impute, noisy_linear_impute
from tame_lit.metrics.localisation import BoxIoU, RelevanceMass, RelevanceRank
from tame_lit.metrics.pointing import PointingGame
from tame_lit.metrics.randomisation import ModelRandomisation, RandomLogit
from tame_lit.metrics.road import RoadScore
from tame_lit.metrics.robustness import AvgSensitivity, LocalLipschitz, MaxSensitivity
from tame_lit.metrics.sparseness import Sparseness

__all__ = [
    "METRICS",
    "AverageDropIncrease",
    "AvgSensitivity",
    "BoxIoU",
    "Column",
    "Complexity",
    "Curve",
    "DeletionInsertion",
    "Explains",
    "FaithfulnessMetric",
    "LocalLipschitz",
    "MaxSensitivity",
    "Model",
    "ModelRandomisation",
    "PointingGame",
    "RandomLogit",
    "RelevanceMass",
    "RelevanceRank",
    "RoadScore",
    "ScoredBatch",
    "Sparseness",
    "available",
    "class_probability",
    "create",
    "explain_in_chunks",
    "hashed_seed",
    "linear_impute",
    "masked_probability",
    "noisy_linear_impute",
    "percent",
    "probabilities",
]

available = METRICS.available


def create(name: str, shared: Mapping[str, Any] | None = None, **options: Any) -> FaithfulnessMetric:
    """Build metric ``name`` with ``options``. ``shared``: evaluation-wide settings (``chunk_size``, ``seed``)
    given to each metric whose constructor takes them, unless ``options`` sets them itself."""
    cls = METRICS.lookup(name)
    parameters = inspect.signature(cls.__init__).parameters
    unknown = sorted(key for key in options if key not in parameters or key == "self")
    if unknown:
        valid = sorted(key for key, p in parameters.items() if key != "self" and p.kind is p.POSITIONAL_OR_KEYWORD)
        raise ValueError(f"metric {name!r} has no option(s) {unknown}; valid: {valid}")
    inherited = {key: value for key, value in (shared or {}).items() if key in parameters and key not in options}
    return cls(**inherited, **options)
