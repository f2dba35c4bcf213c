"""Any method's maps blurred by a Gaussian: the baseline that tells what smoothing alone does to a score.

Blurring a map changes its pixel order (a plateau ranks from its centre; no detail finer than the blur is
left). On EfficientNet-Lite0 it lowers the deletion AUC of Grad-CAM and of a trained head alike (README,
"Which explainer is most faithful?"): scoring ``smoothed`` next to its base separates what a method knows
about the model from what the texture of its maps does to the metric."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor

from tame_lit.backbones import Backbone
from tame_lit.explainers.base import EXPLAINERS, BackboneExplainer, create
from tame_lit.maps import normalize, smooth

__all__ = ["Smoothed"]


@EXPLAINERS.register("smoothed")
class Smoothed(BackboneExplainer):
    """``base``'s maps (a registered method, with its ``layers`` and options) blurred by a Gaussian of standard
    deviation ``sigma`` pixels of the explained image (``maps.smooth``), then min-max again. Costs the base's
    passes and one separable blur. The default 8 pixels is one cell of a 28 x 28 map at 224 px: the blur
    ``head.smoothing=1`` gives a TAME head on Lite0's ``blocks.2``."""

    def __init__(
        self,
        backbone: Backbone,
        base: str = "gradcam",
        sigma: float = 8.0,
        layers: Sequence[str] | str | None = None,
        **base_options: object,
    ) -> None:
        super().__init__(backbone)
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 < sigma < math.inf:
            raise ValueError(f"smoothed: sigma must be a standard deviation > 0 in pixels, got {sigma!r}")
        self.base = create(str(base), backbone, layers, **base_options)
        self.sigma = float(sigma)

    @property
    def needs_gradients(self) -> bool:  # type: ignore[override]
        """Follows the base: gradients only when its maps need them."""
        return self.base.needs_gradients

    def explain(self, images: Tensor, targets: Tensor | None) -> Tensor:
        return normalize(smooth(self.base(images, targets), (self.sigma, self.sigma)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base={self.base!r}, sigma={self.sigma})"
