"""Speed options that leave every result the same up to rounding: ``torch.compile`` and the channels-last memory
format, for the backbone and the head, in training and in explaining (the top-level keys ``compile``,
``compile_options`` and ``channels_last``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch._dynamo
from torch import nn

__all__ = ["Acceleration", "accelerate"]

COMPILE_KEYS = ("mode", "backend", "dynamic", "fullgraph", "options")


@dataclass
class Acceleration:
    """``compile``: each module through ``torch.compile`` in place (``nn.Module.compile``: layer names, hooks and
    state-dict keys stay as they are; the first batches pay the compilation, minutes on a CPU).
    ``compile_options``: ``torch.compile``'s keywords (``mode``, ``backend``, ``dynamic``, ``fullgraph``,
    ``options``). ``channels_last``: the modules' 4-D parameters in channels-last memory format (NHWC), the fast
    layout of convolutions under mixed precision on recent GPUs; a convolution with channels-last weights
    returns channels-last activations, so the layout spreads from the first layer without converting images.
    ``fold_batch_norm``: training's masked passes, which need the backbone's logits only, run a copy of it whose
    batch norms are folded into the convolutions before them (``Backbone.folded``; ``accelerate`` leaves it to
    the training module, the only user)."""

    compile: bool = False
    channels_last: bool = False
    compile_options: dict[str, Any] = field(default_factory=dict)
    fold_batch_norm: bool = True

    def __post_init__(self) -> None:
        unknown = sorted(set(self.compile_options) - set(COMPILE_KEYS))
        if unknown:
            raise ValueError(f"compile_options: unknown key(s) {unknown}; torch.compile takes {list(COMPILE_KEYS)}")


def accelerate(settings: Acceleration, *modules: nn.Module) -> None:
    """Apply ``settings`` to each of ``modules``, in place.

    Compiling also turns on dynamo's guards on module hooks (``skip_nnmodule_hook_guards=False``, a process-wide
    setting): tame-lit captures layers with hooks added for one pass and removed after it, and without those
    guards a graph traced without hooks is reused when hooks are present, silently capturing nothing."""
    if settings.compile:
        torch._dynamo.config.skip_nnmodule_hook_guards = False
    for module in modules:
        if settings.channels_last:
            module.to(memory_format=torch.channels_last)
        if settings.compile:
            module.compile(**settings.compile_options)
