"""Explainers: one call, ``explainer(images, targets) -> maps in [0, 1]``, for trained heads and CAMs."""

from tame_lit.explainers.base import Explainer
from tame_lit.explainers.head import HeadExplainer, head_maps

__all__ = ["Explainer", "HeadExplainer", "head_maps"]
