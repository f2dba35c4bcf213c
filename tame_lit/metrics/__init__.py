"""Faithfulness metrics as torchmetrics classes with sum states, exact under DDP. One file per metric."""

from tame_lit.metrics.ad_ic import AverageDropIncrease, masked_probability
from tame_lit.metrics.base import Model, class_probability, probabilities
from tame_lit.metrics.deletion import DeletionInsertion
from tame_lit.metrics.pointing import PointingGame
from tame_lit.metrics.road import RoadScore, noisy_linear_impute

__all__ = [
    "AverageDropIncrease",
    "DeletionInsertion",
    "Model",
    "PointingGame",
    "RoadScore",
    "class_probability",
    "masked_probability",
    "noisy_linear_impute",
    "probabilities",
]
