"""The contract every explainer honours, whatever runs it (a method on a backbone, a trained head, an exported
program or ONNX graph), and the shared machinery of the layer-based methods (activation capture, gradients
to a layer, map post-processing)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from tame_lit.acceleration import Acceleration, accelerate
from tame_lit.backbones import Backbone
from tame_lit.features import check_layers, preserved_state
from tame_lit.layouts import LAYOUTS
from tame_lit.maps import normalize, upsample
from tame_lit.registry import Registry

__all__ = [
    "BASELINES",
    "EXPLAINERS",
    "BackboneExplainer",
    "Explainer",
    "GradientCAM",
    "LayerExplainer",
    "accelerate_explainers",
    "chunks",
    "create",
    "defined_for",
    "perturbed_logits",
    "to_maps",
]


class Explainer:
    """What every explainer is: ``explainer(images, targets=None) -> maps``, and the model's own answer.

    ``images``: float ``[B, 3, H, W]`` in [0, 1] on any device; ``targets``: ``LongTensor[B]`` of class
    indices, or ``None`` for each image's top-1 class. ``__call__`` returns float32 ``[B, H, W]`` maps in
    [0, 1] on the images' device: it checks the inputs (``check_images``, ``check_targets``), runs the
    kind's hook ``compute_maps(images, targets)`` and checks the result's shape. ``predict(images)`` gives
    the explained model's logits ``[B, num_classes]`` (for probabilities, top-k, titles). A kind gives
    ``num_classes``, ``backbone_name``, ``input_size``, ``predict`` and ``compute_maps``; ``to(device)``
    moves what it runs on (kinds that move their inputs instead keep the default).
    """

    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    @property
    def backbone_name(self) -> str | None:
        """The name of the explained classifier (``None`` when a file does not say)."""
        raise NotImplementedError

    @property
    def input_size(self) -> tuple[int, int]:
        """The image size ``(H, W)`` the explained classifier was made for."""
        raise NotImplementedError

    def networks(self) -> list[nn.Module]:
        """The torch modules it runs (what ``compile`` and ``channels_last`` apply to); none for compiled files."""
        return []

    def predict(self, images: Tensor) -> Tensor:
        """The explained model's logits ``[B, num_classes]`` (float32) for ``images``, without gradients."""
        raise NotImplementedError

    def compute_maps(self, images: Tensor, targets: Tensor | None) -> Tensor:
        """The kind's maps ``[B, H, W]`` for checked inputs (``targets`` on the images' device, or ``None``)."""
        raise NotImplementedError

    def to(self, device: str | torch.device) -> Explainer:
        return self

    def __call__(self, images: Tensor, targets: Tensor | None = None) -> Tensor:
        self.check_images(images)
        if targets is not None:
            targets = self.check_targets(targets, images.shape[0]).to(images.device)
        maps = self.compute_maps(images, targets)
        if maps.shape != (images.shape[0], *images.shape[-2:]):
            raise RuntimeError(f"{type(self).__name__} returned {tuple(maps.shape)} for images {tuple(images.shape)}")
        return maps.detach().float().to(images.device)

    @staticmethod
    def check_images(images: Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"images must be float [B, 3, H, W] in [0, 1], got {images.dtype} {tuple(images.shape)}")

    def check_targets(self, targets: Tensor | int | list, batch: int) -> Tensor:
        targets = torch.as_tensor(targets)
        if targets.dim() != 1 or targets.shape[0] != batch or targets.is_floating_point():
            raise ValueError(
                f"targets must be a LongTensor of {batch} class indices (one per image), got "
                f"{targets.dtype} {tuple(targets.shape)}"
            )
        bad = targets[(targets < 0) | (targets >= self.num_classes)]
        if bad.numel():
            raise ValueError(f"targets must be in [0, {self.num_classes}), got {bad.tolist()}")
        return targets.long()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backbone={self.backbone_name!r})"


class BackboneExplainer(Explainer):
    """An explainer computed on a tame-lit ``Backbone`` in this process: CAM methods and trained heads.

    Subclasses implement ``explain(images, targets)``; ``compute_maps`` runs it with the backbone in eval
    mode and its state (modes, ``requires_grad``) restored afterwards, and enables gradients for methods
    that need them (also inside ``inference_mode``/``no_grad``). Maps are computed in float32, also under
    autocast.
    """

    needs_gradients: ClassVar[bool] = False
    # the feature layouts (tame_lit.layouts) the method is defined on; ``defined_for`` lists methods by layout
    layouts: ClassVar[tuple[str, ...]] = LAYOUTS

    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone

    def networks(self) -> list[nn.Module]:
        return [self.backbone]

    @property
    def num_classes(self) -> int:
        return self.backbone.num_classes

    @property
    def backbone_name(self) -> str:
        return self.backbone.name

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.backbone.input_size)

    def to(self, device: str | torch.device) -> BackboneExplainer:
        self.backbone.to(device)
        return self

    def on_backbone(self, backbone: Backbone) -> BackboneExplainer:
        """This explainer, settings and all, on ``backbone``: another copy of the same architecture (the
        randomisation test's randomised model). Every reference to this backbone, its modules, parameters and
        buffers (a CAM classifier, rollout's attention modules, a nested base method) points to the other's;
        the rest (a trained head) is copied, so neither explainer changes the other."""
        own, other = dict(self.backbone.named_modules()), dict(backbone.named_modules())
        if own.keys() != other.keys():
            raise ValueError(
                f"on_backbone needs a copy of {self.backbone.name!r} (the same modules); it differs in "
                f"{sorted(own.keys() ^ other.keys())[:5]}"
            )
        memo: dict[int, object] = {id(self.backbone): backbone}
        for name, module in own.items():
            memo[id(module)] = other[name]
            for tensors in ("_parameters", "_buffers"):
                for key, tensor in getattr(module, tensors).items():
                    if tensor is not None:
                        memo[id(tensor)] = getattr(other[name], tensors)[key]
        return copy.deepcopy(self, memo)

    def predict(self, images: Tensor) -> Tensor:
        self.check_images(images)
        with preserved_state(self.backbone), torch.no_grad():
            self.backbone.eval()
            return self.backbone(images).float()

    def compute_maps(self, images: Tensor, targets: Tensor | None) -> Tensor:
        with preserved_state(self.backbone), contextlib.ExitStack() as stack:
            # explain the model as it predicts: eval mode (batch-norm statistics of a batch of masked
            # images would make a map depend on the others); the caller's modes come back on exit
            self.backbone.eval()
            if self.needs_gradients:
                stack.enter_context(torch.inference_mode(False))
                stack.enter_context(torch.enable_grad())
                images = images.clone()  # an inference tensor becomes a normal one
            else:
                stack.enter_context(torch.no_grad())
            return self.explain(images, targets)

    def explain(self, images: Tensor, targets: Tensor | None) -> Tensor:
        raise NotImplementedError


def defined_for(layout: str) -> list[str]:
    """The registered methods defined on networks whose layers have ``layout`` (``"spatial"``: the CNN methods;
    ``"tokens"``: those for ViT/DeiT, attention rollout among them). A method may still refuse one model (CAM
    where no average pooling feeds one linear layer), saying why."""
    return [name for name in EXPLAINERS.available() if layout in getattr(EXPLAINERS[name], "layouts", LAYOUTS)]


def to_maps(low_res: Tensor, size: Sequence[int]) -> Tensor:
    """Min-max each ``[B, h, w]`` map at its own resolution, then bilinear upsampling to ``size``."""
    return upsample(normalize(low_res), tuple(size))


def chunks(count: int, size: int) -> list[slice]:
    """Slices of at most ``size`` covering ``range(count)`` (perturbation methods batch their passes)."""
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    return [slice(start, min(start + size, count)) for start in range(0, count, size)]


BASELINES = ("mean", "black")


def perturbed_logits(backbone: Backbone, images: Tensor, masks: Tensor, baseline: str = "mean") -> Tensor:
    """Logits of ``images`` ([N, 3, H, W] in [0, 1]) multiplied by ``masks`` ([N, 1, H, W] in [0, 1]).

    ``baseline="mean"`` multiplies the *normalised* image, so removed pixels take the dataset's mean
    colour (what the Score-CAM, RISE and SISE reference codes do); ``"black"`` multiplies the [0, 1]
    image, so removed pixels are black (what TAME's training and AD/IC do).
    """
    if baseline == "mean":
        return backbone.model(backbone.normalize(images) * masks.to(images.dtype))
    if baseline == "black":
        return backbone(images * masks.to(images.dtype))
    raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")


class LayerExplainer(BackboneExplainer):
    """An explainer that reads one or more named layers (default: the backbone's CAM layer)."""

    def __init__(self, backbone: Backbone, layers: Sequence[str] | str | None = None) -> None:
        super().__init__(backbone)
        if layers is None:
            layers = [backbone.cam_layer]
        elif isinstance(layers, str):
            layers = [layers]
        self.layers = tuple(check_layers(backbone.model, list(layers), backbone.name))

    @property
    def layer(self) -> str:
        if len(self.layers) != 1:
            raise ValueError(f"{type(self).__name__} reads one layer, got {list(self.layers)}")
        return self.layers[0]

    def forward_layers(self, images: Tensor, grad_roots: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        return self.backbone.features(images, self.layers, grad_roots=grad_roots)

    @staticmethod
    def resolve_targets(logits: Tensor, targets: Tensor | None) -> Tensor:
        return logits.argmax(dim=1) if targets is None else targets

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backbone={self.backbone.name!r}, layers={list(self.layers)})"


class GradientCAM(LayerExplainer):
    """The Grad-CAM family: one forward pass, gradients of the target's logit down to the layer(s) only.

    Subclasses give ``layer_map(activations, gradients) -> [B, h, w]`` (float32, before normalisation);
    with several layers the per-layer maps are min-max normalised, upsampled and averaged.
    """

    needs_gradients = True

    def explain(self, images: Tensor, targets: Tensor | None) -> Tensor:
        activations, gradients = self.activations_and_gradients(images, targets)
        size = images.shape[-2:]
        maps = [to_maps(self.layer_map(activations[n], gradients[n]), size) for n in self.layers]
        return self.fuse(maps)

    def activations_and_gradients(
        self, images: Tensor, targets: Tensor | None
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Float32 activations and d(logit of the target)/d(activation) for each layer."""
        logits, captured = self.forward_layers(images, grad_roots=True)
        targets = self.resolve_targets(logits, targets)
        score = logits.float().gather(1, targets[:, None]).sum()  # images do not interact: per-image grads
        tensors = [captured[name] for name in self.layers]
        grads = torch.autograd.grad(score, tensors, allow_unused=True)
        activations = {name: t.detach().float() for name, t in zip(self.layers, tensors, strict=True)}
        gradients = {
            name: torch.zeros_like(activations[name]) if g is None else g.float()
            for name, g in zip(self.layers, grads, strict=True)
        }
        return activations, gradients

    def layer_map(self, activations: Tensor, gradients: Tensor) -> Tensor:
        weights = self.channel_weights(activations, gradients)
        return torch.relu((weights[:, :, None, None] * activations).sum(dim=1))

    def channel_weights(self, activations: Tensor, gradients: Tensor) -> Tensor:
        raise NotImplementedError

    def fuse(self, maps: list[Tensor]) -> Tensor:
        if len(maps) == 1:
            return maps[0]
        return normalize(torch.stack(maps).mean(dim=0))


# name -> method class; each method's file registers itself (``@EXPLAINERS.register("name")``)
EXPLAINERS: Registry[type[BackboneExplainer]] = Registry("explainer")


def accelerate_explainers(settings: Acceleration, explainers: Iterable[Explainer]) -> None:
    """``compile`` / ``channels_last`` for every network the explainers run, each once (they share the backbone)."""
    networks = {id(network): network for explainer in explainers for network in explainer.networks()}
    accelerate(settings, *networks.values())


def create(name: str, backbone: Backbone, layers: Sequence[str] | str | None = None, **options: object) -> Explainer:
    """Build explainer ``name`` for ``backbone``; ``layers`` defaults to the backbone's CAM layer."""
    cls = EXPLAINERS.lookup(name)
    if layers is not None:
        options["layers"] = layers
    return cls(backbone, **options)
