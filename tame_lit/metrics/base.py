"""What every perturbation metric needs: the model's probability of the explained class on many images."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["Model", "class_probability", "probabilities"]

# images in [0, 1], [N, 3, H, W] -> logits [N, classes] (a tame-lit Backbone is one)
Model = Callable[[Tensor], Tensor]


def class_probability(logits: Tensor, targets: Tensor) -> Tensor:
    """Softmax probability of each image's target class, in float32: ``[B]``."""
    return logits.float().softmax(dim=1).gather(1, targets[:, None]).squeeze(1)


@torch.no_grad()
def probabilities(model: Model, images: Tensor, targets: Tensor, chunk_size: int = 64) -> Tensor:
    """``class_probability(model(images), targets)`` with at most ``chunk_size`` images per forward pass.

    The perturbation metrics build many perturbed copies of a batch; chunking bounds the memory of the
    forward passes without changing any value (the model is in eval mode: images do not interact).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if images.shape[0] != targets.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {targets.shape[0]} targets")
    parts = [
        class_probability(model(images[start : start + chunk_size]), targets[start : start + chunk_size])
        for start in range(0, images.shape[0], chunk_size)
    ]
    return torch.cat(parts) if parts else images.new_zeros(0, dtype=torch.float32)
