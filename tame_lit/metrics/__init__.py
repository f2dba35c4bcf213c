"""Faithfulness metrics as torchmetrics classes with sum states, exact under DDP."""

from tame_lit.metrics.ad_ic import AverageDropIncrease

__all__ = ["AverageDropIncrease"]
