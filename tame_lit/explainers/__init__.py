"""Explainers: one call, ``explainer(images, targets=None) -> maps in [0, 1]``, for CAM methods and
trained heads alike (``base.Explainer`` is the contract). One file per method over ``base.py``; a new method
is a file whose class is decorated with ``@EXPLAINERS.register("name")``, one import line here, and a config
in ``conf/explainer/`` (plus its line in ``conf/evaluate.yaml``'s defaults). Trained heads load from files
with ``tame_lit.load_explainer``."""

from __future__ import annotations

# every method file registers its class when imported
from tame_lit.explainers import (  # noqa: F401
    ablationcam,
    attention_gradcam,
    cam,
    ge,
    gradcam,
    gradcampp,
    layercam,
    random,
    rise,
    rollout,
    sacam_posthoc,
    scorecam,
    sise,
    smoothed,
    xgradcam,
)
from tame_lit.explainers.base import (
    EXPLAINERS,
    BackboneExplainer,
    Explainer,
    GradientCAM,
    LayerExplainer,
    accelerate_explainers,
    create,
    defined_for,
)
from tame_lit.explainers.head import HeadExplainer, head_maps

__all__ = [
    "EXPLAINERS",
    "BackboneExplainer",
    "Explainer",
    "GradientCAM",
    "HeadExplainer",
    "LayerExplainer",
    "accelerate_explainers",
    "available",
    "create",
    "defined_for",
    "explainer_class",
    "head_maps",
]

explainer_class = EXPLAINERS.lookup
available = EXPLAINERS.available
