"""Faithfulness metrics as torchmetrics classes with sum states, exact under DDP."""

from tame_lit.metrics.ad_ic import AverageDropIncrease, class_probability, masked_probability

__all__ = ["AverageDropIncrease", "class_probability", "masked_probability"]
