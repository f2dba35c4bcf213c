"""Explainers: one call, ``explainer(images, targets=None) -> maps in [0, 1]``, for CAM methods and
trained heads alike. One file per method over ``base.py``; a new method is a file plus one line in
``EXPLAINERS`` and a config in ``conf/explainer/``."""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from tame_lit.backbones import Backbone
from tame_lit.explainers.base import Explainer, GradientCAM, LayerExplainer
from tame_lit.explainers.head import HeadExplainer, head_maps, load_explainer

__all__ = [
    "EXPLAINERS",
    "Explainer",
    "GradientCAM",
    "HeadExplainer",
    "LayerExplainer",
    "available",
    "create",
    "head_maps",
    "load_explainer",
]

# name -> "module:Class", imported on first use
EXPLAINERS: dict[str, str] = {
    "cam": "tame_lit.explainers.cam:CAM",
    "gradcam": "tame_lit.explainers.gradcam:GradCAM",
    "gradcampp": "tame_lit.explainers.gradcampp:GradCAMPlusPlus",
    "xgradcam": "tame_lit.explainers.xgradcam:XGradCAM",
    "layercam": "tame_lit.explainers.layercam:LayerCAM",
    "scorecam": "tame_lit.explainers.scorecam:ScoreCAM",
    "ablationcam": "tame_lit.explainers.ablationcam:AblationCAM",
    "rise": "tame_lit.explainers.rise:RISE",
    "sise": "tame_lit.explainers.sise:SISE",
    "ge": "tame_lit.explainers.ge:GradualExtrapolation",
    "attention_gradcam": "tame_lit.explainers.attention_gradcam:AttentionGradCAM",
    "sacam_posthoc": "tame_lit.explainers.sacam_posthoc:PostHocSACAM",
    "random": "tame_lit.explainers.random:RandomMaps",
}


def explainer_class(name: str) -> type[Explainer]:
    if name not in EXPLAINERS:
        raise ValueError(f"unknown explainer {name!r}; available: {available()}")
    module, _, cls = EXPLAINERS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def available() -> list[str]:
    """Registered explainer names (trained heads load from files with ``load_explainer``)."""
    return sorted(EXPLAINERS)


def create(name: str, backbone: Backbone, layers: Sequence[str] | str | None = None, **options: object) -> Explainer:
    """Build explainer ``name`` for ``backbone``; ``layers`` defaults to the backbone's CAM layer."""
    cls = explainer_class(name)
    if layers is not None:
        options["layers"] = layers
    return cls(backbone, **options)
