"""Running a frozen network safely: capture named layers with forward hooks, find its stage outputs, cut
out the part after a layer, and leave it exactly as it was found (hooks, train/eval modes, ``requires_grad``
flags)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.fx
from torch import Tensor, nn

from tame_lit.layouts import FeatureLayout

__all__ = ["capture", "check_layers", "count_hooks", "model_tail", "preserved_state", "stage_outputs"]

SPATIAL = FeatureLayout()  # CNN maps, recorded as they are


def check_layers(model: nn.Module, layers: Sequence[str], model_name: str = "model") -> dict[str, nn.Module]:
    """Resolve layer names to modules, or fail with the list of valid names."""
    if isinstance(layers, str):
        raise TypeError(f"layers must be a list of names, got the single string {layers!r}; write [{layers!r}]")
    modules = dict(model.named_modules())
    unknown = [name for name in layers if name not in modules or name == ""]
    if unknown:
        valid = ", ".join(name for name in modules if name)
        raise ValueError(f"unknown layer name(s) {unknown} for {model_name}; valid names are: {valid}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layer names must be unique, got {list(layers)}")
    return {name: modules[name] for name in layers}


class _Recorder:
    """Forward hook that keeps a layer's output and hands a copy to the rest of the network.

    The stored tensor stays in the autograd graph (gradients w.r.t. it are exact) and an in-place op
    further down (``ReLU(inplace=True)`` after a hooked conv) only ever touches the copy. A plain class
    rather than a closure, so a model with hooks attached can still be pickled (``ddp_spawn``).
    """

    def __init__(
        self,
        name: str,
        store: dict[str, Tensor],
        grad_root: bool = False,
        layout: FeatureLayout = SPATIAL,
        image_size: Sequence[int] | None = None,
    ) -> None:
        self.name = name
        self.store = store
        self.grad_root = grad_root
        self.layout = layout
        self.image_size = image_size

    def __call__(self, module: nn.Module, inputs: tuple, output: object) -> Tensor:
        if not isinstance(output, Tensor):
            raise TypeError(
                f"layer {self.name!r} ({type(module).__name__}) returns {type(output).__name__}, not a tensor; "
                "hook a module whose output is a single feature map"
            )
        if self.name in self.store:
            raise RuntimeError(
                f"layer {self.name!r} ran more than once in one forward pass (the module is reused); "
                "hook a module that runs once, such as its parent block"
            )
        if self.layout.kind == "spatial":
            feature_map = output
        else:
            if self.image_size is None:
                raise ValueError(f"capturing {self.name!r} in the {self.layout.kind} layout needs the input's size")
            feature_map = self.layout.to_map(output, module, self.image_size, self.name)
        if self.grad_root and not feature_map.requires_grad:
            # start the autograd graph here: gradients w.r.t. this layer need nothing below it
            feature_map = feature_map.detach().requires_grad_(True)
        self.store[self.name] = feature_map
        # the rest of the network runs on a copy rebuilt from the stored map: gradients w.r.t. the map are exact
        return self.layout.from_map(feature_map, output, module).clone()


@contextlib.contextmanager
def capture(
    model: nn.Module,
    layers: Sequence[str],
    model_name: str = "model",
    grad_roots: bool = False,
    layout: FeatureLayout = SPATIAL,
    image_size: Sequence[int] | None = None,
) -> Iterator[dict[str, Tensor]]:
    """Record the outputs of ``layers`` during forward passes run inside the ``with`` block.

    Yields a dict that fills up as the model runs; clear it between passes. With ``grad_roots`` (and grad
    enabled), a captured output that has no autograd history becomes a leaf that requires grad, so
    ``torch.autograd.grad(score, captured)`` works on a frozen model and never runs backward below the
    shallowest captured layer. ``layout`` (``tame_lit.layouts``; ``image_size``: the input's (H, W)) turns token
    sequences and channels-last stages into ``[B, C, h, w]`` maps as they are recorded. The hooks are removed
    when the block exits, also through an exception.
    """
    modules = check_layers(model, layers, model_name)
    store: dict[str, Tensor] = {}
    handles = []
    try:
        for name, module in modules.items():
            recorder = _Recorder(name, store, grad_roots, layout, image_size)
            handles.append(module.register_forward_hook(recorder))
        yield store
    finally:
        for handle in handles:
            handle.remove()


def count_hooks(model: nn.Module) -> int:
    """Number of forward, pre-forward and backward hooks on all modules (for leak checks)."""
    total = 0
    for module in model.modules():
        total += len(module._forward_hooks) + len(module._forward_pre_hooks)
        total += len(module._backward_hooks) + len(module._backward_pre_hooks)
    return total


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[nn.Module]:
    """Restore every module's train/eval mode and every parameter's ``requires_grad`` on exit."""
    modes = [(module, module.training) for module in model.modules()]
    flags = [(param, param.requires_grad) for param in model.parameters()]
    try:
        yield model
    finally:
        for module, mode in modes:
            module.training = mode
        for param, flag in flags:
            param.requires_grad_(flag)


_PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def stage_outputs(model: nn.Module, example: Tensor, conv_only: bool = False) -> list[str]:
    """Names of the layers that end each spatial resolution of a CNN, shallow to deep.

    A network is read as a chain of steps: the children of the model and, recursively, of its
    ``Sequential`` / ``ModuleList`` containers (conv layers, residual blocks, stages; never the inside of
    a block). For every resolution the 4-D feature maps pass through, the answer is the last step that
    outputs it: the tensor that feeds the next down-sampling, or the last feature map (ResNet-50: relu,
    layer1, layer2, layer3, layer4; VGG-16: features.3, .8, .15, .22, .29 and the last pool).
    ``conv_only`` drops resolutions at which no convolution runs (VGG-16's final 7x7 pool output): then
    the result is SISE's rule, the last layer before each down-sampling plus the last conv output.
    Runs ``example`` once in eval mode under ``no_grad``; the model's state is left as it was.
    """
    modules = dict(model.named_modules())

    def is_step(name: str) -> bool:
        """A child of the model or of a container, itself inside steps only (not inside a block)."""
        parent_name = name.rpartition(".")[0]
        if not parent_name:
            return True
        return isinstance(modules[parent_name], (nn.Sequential, nn.ModuleList)) and is_step(parent_name)

    events: list[tuple[str, tuple[int, int]]] = []
    conv_sizes: set[tuple[int, int]] = set()

    def record(name: str):
        def hook(module: nn.Module, inputs: tuple, output: object) -> None:
            if isinstance(output, Tensor) and output.dim() == 4 and output.shape[-2:].numel() > 1:
                events.append((name, tuple(output.shape[-2:])))

        return hook

    def record_conv(module: nn.Module, inputs: tuple, output: object) -> None:
        if isinstance(output, Tensor) and output.dim() == 4:
            conv_sizes.add(tuple(output.shape[-2:]))

    steps = [name for name, module in modules.items() if name and is_step(name)]
    handles = [
        modules[name].register_forward_hook(record(name))
        for name in steps
        if not isinstance(modules[name], _PASS_THROUGH)
    ]
    handles += [m.register_forward_hook(record_conv) for m in modules.values() if isinstance(m, nn.Conv2d)]
    try:
        with preserved_state(model), torch.no_grad():
            model.eval()
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    last_at_size: dict[tuple[int, int], str] = {}
    for name, size in events:
        if conv_only and size not in conv_sizes:
            continue
        last_at_size.pop(size, None)
        last_at_size[size] = name
    last_run = {name: index for index, (name, _) in enumerate(events)}
    return sorted(set(last_at_size.values()), key=last_run.__getitem__)


class _TailTracer(torch.fx.Tracer):
    """Traces only the modules that contain ``layer``; every other module (``layer`` included) is one opaque
    call, so code that fx cannot trace is harmless unless it sits on the path down to ``layer``."""

    def __init__(self, layer: str) -> None:
        super().__init__()
        parts = layer.split(".")
        self.ancestors = {".".join(parts[:end]) for end in range(1, len(parts))}

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return qualified_name not in self.ancestors


def model_tail(model: nn.Module, layer: str) -> nn.Module | None:
    """A module computing ``model``'s output from the output of ``layer``, or ``None`` if there is none.

    Methods that perturb one layer's activations (Ablation-CAM) then re-run only what follows the layer, not
    the whole network. The tail calls the model's own modules: parameters are shared (never copied) and
    train/eval modes are the model's. ``None`` when tracing fails (data-dependent control flow on the path to
    ``layer``), when ``layer`` runs more than once, or when the output also depends on the input other than
    through ``layer`` (a skip connection around it, as for a conv inside a residual block): only the full
    forward pass is right then. The input is cloned first, so an in-place op after ``layer`` (``ReLU(inplace)``)
    never changes the caller's tensor. Python branches on ``self.training`` are fixed at the mode the model had
    when the tail was built.
    """
    check_layers(model, [layer])
    try:
        graph = _TailTracer(layer).trace(model)
    except Exception:  # fx raises many kinds (TraceError, TypeError, RuntimeError...) on untraceable code
        return None
    calls = [node for node in graph.nodes if node.op == "call_module" and node.target == layer]
    if len(calls) != 1:
        return None
    start = calls[0]
    # what the output needs, walking back from it and stopping at the layer
    needed: set[torch.fx.Node] = set()
    pending = [graph.output_node()]
    while pending:
        node = pending.pop()
        if node not in needed:
            needed.add(node)
            if node is not start:
                pending.extend(node.all_input_nodes)
    if start not in needed or any(node.op == "placeholder" for node in needed):
        return None
    tail = torch.fx.Graph()
    copies = {start: tail.call_method("clone", (tail.placeholder("activation"),))}
    for node in graph.nodes:  # topological order
        if node in needed and node is not start:
            copies[node] = tail.node_copy(node, copies.__getitem__)
    return torch.fx.GraphModule(model, tail, class_name=f"{type(model).__name__}Tail")
