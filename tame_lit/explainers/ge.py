"""Gradual Extrapolation (Szandała, IEEE Access 2021; spec methods.md §D): a coarse map from any method is
sharpened by carrying it up through the down-sampling layers, multiplied at each by their activations."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tame_lit.backbones import Backbone
from tame_lit.explainers.base import EXPLAINERS, BackboneExplainer, GradientCAM, LayerExplainer, create
from tame_lit.maps import normalize, upsample

__all__ = ["GradualExtrapolation", "excitation_layers"]


def excitation_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every ``nn.MaxPool2d`` and every ``nn.Conv2d`` with a stride above 1, anywhere in ``model`` (the
    official rule; subclasses such as timm's ``Conv2dSame`` and ``MaxPool2dSame`` count too)."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.MaxPool2d)
        or (isinstance(module, nn.Conv2d) and any(step > 1 for step in module.stride))
    }


class _ExcitationRecorder:
    """Forward hook appending a copy of each output (and of the input of the first layer to run) to ``store``.

    Copies, because an in-place op further on (AlexNet's strided conv -> ``ReLU(inplace=True)``) would
    otherwise change what was recorded. A plain class, so a hooked model can still be pickled.
    """

    def __init__(self, store: list[Tensor]) -> None:
        self.store = store

    def __call__(self, module: nn.Module, inputs: tuple, output: object) -> None:
        if not self.store and inputs and isinstance(inputs[0], Tensor):
            self.store.append(inputs[0].detach().clone())  # e_0, "for sharpness" in the official code
        if isinstance(output, Tensor) and output.dim() == 4:
            self.store.append(output.detach().clone())


@contextlib.contextmanager
def _recording(modules: Sequence[nn.Module]) -> Iterator[list[Tensor]]:
    """Excitations, in execution order, of the forward passes run inside the block; hooks always removed."""
    store: list[Tensor] = []
    recorder = _ExcitationRecorder(store)
    handles = []
    try:
        for module in modules:
            handles.append(module.register_forward_hook(recorder))
        yield store
    finally:
        for handle in handles:
            handle.remove()


@EXPLAINERS.register("ge")
class GradualExtrapolation(BackboneExplainer):
    """Gradual Extrapolation of a ``base`` explainer's coarse map (default: Grad-CAM at the CAM layer).

    With E = [e_0, e_1, ..., e_L] the outputs of every max-pool and strided conv in execution order
    (e_0 the input of the first of them), and H the base's min-max map at its layer's resolution:
    for e in reversed(E): H <- bilinear(H, size of e) * sum_channels(e) / max(e); then
    (H - mean) / std, clipped to [-1, 1], min-max, and bilinear upsampling to the image size.

    Where the official code (szandala/gradual-extrapolation @3c098014) is batch-dependent, the default is
    per image, so a map never depends on the batch it is computed in: ``max(e)`` and the output
    normalisation are per image (the per-image normalisation cancels the scale of max(e); only its sign
    can still matter). ``only_preceding`` (default, the paper's "preceding layers") skips every
    excitation with a smaller spatial size than H's at that point, i.e. the layers after the base's layer;
    the official demo applies them all (VGG-16's pool5 first shrinks the 14x14 map to 7x7).
    ``match_official_demo=True`` reproduces the code: batch-wide max and normalisation, every excitation
    (``only_preceding`` is ignored), so the maps then depend on the batch. ``relu_excitations`` applies
    ReLU to each excitation: ResNet-style strided convs are hooked before their batch norm and can be
    negative, which flips the sign of H. A zero max(e) divides by 1 instead of making NaNs.

    Coarse map: for a Grad-CAM-family base (``GradientCAM``), its ``layer_map`` at each of its layers,
    min-max (several layers: resized to the smallest and fused by the base's ``fuse``); the excitations
    come from the same forward pass, so GE adds no pass to the base's. For any other base (Score-CAM,
    RISE, a trained head, ...), its final full-resolution map resized bilinearly to the smallest
    resolution of the base's layers (a ``LayerExplainer``) or, without layers, of the excitations, plus
    one extra forward pass without gradients for the excitations.
    """

    def __init__(
        self,
        backbone: Backbone,
        base: str | BackboneExplainer = "gradcam",
        layers: Sequence[str] | str | None = None,
        only_preceding: bool = True,
        relu_excitations: bool = False,
        match_official_demo: bool = False,
        **base_options: object,
    ) -> None:
        super().__init__(backbone)
        if isinstance(base, BackboneExplainer):
            if layers is not None or base_options:
                raise ValueError("give layers and options to the base explainer itself when passing an instance")
            if base.backbone is not backbone:
                raise ValueError("the base explainer must explain the same backbone as GradualExtrapolation")
            self.base = base
        else:
            self.base = create(str(base), backbone, layers, **base_options)
        self.excitation_names = tuple(excitation_layers(backbone.model))
        if not self.excitation_names:
            raise ValueError(
                f"{backbone.name} has no nn.MaxPool2d or strided nn.Conv2d layer: Gradual Extrapolation has "
                "no excitations to extrapolate through"
            )
        self.only_preceding = bool(only_preceding)
        self.relu_excitations = bool(relu_excitations)
        self.match_official_demo = bool(match_official_demo)

    @property
    def needs_gradients(self) -> bool:  # type: ignore[override]
        """Follows the base: gradients only when the base's map needs them."""
        return self.base.needs_gradients

    def explain(self, images: Tensor, targets: Tensor | None) -> Tensor:
        coarse, excitations = self.coarse_map_and_excitations(images, targets)
        heat = self.extrapolate(coarse, excitations)
        return upsample(heat, images.shape[-2:])

    def coarse_map_and_excitations(self, images: Tensor, targets: Tensor | None) -> tuple[Tensor, list[Tensor]]:
        """The base's min-max map ``[B, h, w]`` at the resolution GE starts from, and the excitations."""
        modules = [self.backbone.layer(name) for name in self.excitation_names]
        base = self.base
        if isinstance(base, GradientCAM):
            with _recording(modules) as excitations:
                activations, gradients = base.activations_and_gradients(images, targets)
            layer_maps = [normalize(base.layer_map(activations[n], gradients[n])) for n in base.layers]
            size = min((m.shape[-2:] for m in layer_maps), key=lambda s: s.numel())
            return base.fuse([upsample(m, size) for m in layer_maps]), excitations
        final = base(images, targets)
        layers = base.layers if isinstance(base, LayerExplainer) else ()
        with _recording(modules) as excitations, torch.no_grad():
            _, features = self.backbone.features(images, layers)
        sizes = [t.shape[-2:] for t in features.values()] or [e.shape[-2:] for e in excitations]
        return normalize(upsample(final, min(sizes, key=lambda s: s.numel()))), excitations

    def extrapolate(self, coarse: Tensor, excitations: list[Tensor]) -> Tensor:
        """Carry ``coarse`` ``[B, h, w]`` up through the excitations; normalised ``[B, H0, W0]`` in [0, 1]."""
        heat = coarse.float().unsqueeze(1)
        batch_wide = self.match_official_demo
        for excitation in reversed(excitations):
            size = excitation.shape[-2:]
            if self.only_preceding and not batch_wide and (size[0] < heat.shape[-2] or size[1] < heat.shape[-1]):
                continue  # a layer after the base's layer: it would only shrink the map
            excitation = excitation.float()
            if self.relu_excitations:
                excitation = torch.relu(excitation)
            if heat.shape[-2:] != size:
                heat = F.interpolate(heat, size=tuple(size), mode="bilinear", align_corners=False)
            peak = excitation.amax() if batch_wide else excitation.amax(dim=(1, 2, 3), keepdim=True)
            heat = heat * excitation.sum(dim=1, keepdim=True) / torch.where(peak != 0, peak, torch.ones_like(peak))
        return self.standardise(heat.squeeze(1))

    def standardise(self, heat: Tensor) -> Tensor:
        """(H - mean) / std (unbiased, as ``Tensor.std``), clip to [-1, 1], min-max: per image by default,
        over the whole batch with ``match_official_demo``. A constant map becomes zeros."""
        dims = tuple(range(heat.dim())) if self.match_official_demo else (1, 2)
        mean = heat.mean(dim=dims, keepdim=True)
        std = heat.std(dim=dims, keepdim=True)
        scaled = torch.where(std > 0, (heat - mean) / std, torch.zeros_like(heat)).clamp(-1.0, 1.0)
        if not self.match_official_demo:
            return normalize(scaled)
        low, high = scaled.amin(), scaled.amax()
        return torch.where(high > low, (scaled - low) / (high - low), torch.zeros_like(scaled))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(base={self.base!r}, only_preceding={self.only_preceding}, "
            f"relu_excitations={self.relu_excitations}, match_official_demo={self.match_official_demo})"
        )
