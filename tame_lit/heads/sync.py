"""Batch statistics over the images of every process, so that N processes with batch B / N train a head as one
process with batch B does (DDP); torch's ``SyncBatchNorm`` does this on GPUs only, this works on any backend
(gloo on CPU included)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.nn.functional import all_reduce

__all__ = ["CrossProcessBatchNorm2d", "distributed", "synchronise_batch_norm"]


def distributed() -> bool:
    """Whether more than one process is training together."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class CrossProcessBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training-mode mean and variance are those of all processes' images together.

    Two all-reduces per call (sums, then squared deviations from the global mean: as exact in float32 as one
    process's two-pass statistics), both differentiable, so the gradient through the statistics is that of the
    whole batch. Outside training, or with one process, it is ``BatchNorm2d``. Every process must call it the
    same number of times per step: a process whose batch is empty calls it on a zero-size batch.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and distributed()):
            return super().forward(x)
        values = x.float()
        local_sum = values.sum(dim=(0, 2, 3))
        count = torch.full((1,), values.numel() // max(values.shape[1], 1), dtype=values.dtype, device=x.device)
        totals = all_reduce(torch.cat([local_sum, count]))
        n = totals[-1].clamp_min(1)  # every process idle (all batches empty): outputs are empty anyway
        mean = totals[:-1] / n
        centred = values - mean.view(1, -1, 1, 1)
        var = all_reduce(centred.pow(2).sum(dim=(0, 2, 3))) / n
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            self._update_running_stats(mean.detach(), var.detach(), totals[-1].detach())
        scale = torch.rsqrt(var + self.eps)
        out = centred * scale.view(1, -1, 1, 1)
        if self.affine:
            out = out * self.weight.view(1, -1, 1, 1).float() + self.bias.view(1, -1, 1, 1).float()
        return out.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, n: Tensor) -> None:
        """As ``BatchNorm2d``: the unbiased variance, momentum (or a cumulative average when it is None); a step
        with no image anywhere leaves them (decided on the device: no host sync)."""
        seen = n > 0
        self.num_batches_tracked.add_(seen.to(self.num_batches_tracked.dtype))
        if self.momentum is None:
            factor = 1.0 / self.num_batches_tracked.clamp_min(1).to(mean.dtype)
        else:
            factor = torch.tensor(self.momentum, dtype=mean.dtype, device=mean.device)
        factor = torch.where(seen, factor, torch.zeros_like(factor))
        unbiased = var * torch.where(n > 1, n / (n - 1).clamp_min(1), torch.ones_like(n))
        for buffer, value in ((self.running_mean, mean), (self.running_var, unbiased)):
            buffer.copy_(buffer * (1 - factor).to(buffer.dtype) + value.to(buffer.dtype) * factor.to(buffer.dtype))


def synchronise_batch_norm(module: nn.Module) -> nn.Module:
    """``module`` with each ``BatchNorm2d`` replaced by a ``CrossProcessBatchNorm2d`` holding the same parameters
    and buffers (same state-dict keys: checkpoints and exports are unchanged)."""
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, CrossProcessBatchNorm2d):
        state = next(iter(module.state_dict().values()), None)  # none: neither affine nor tracking statistics
        synced = CrossProcessBatchNorm2d(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
            device=None if state is None else state.device,
        )  # fmt: skip
        synced.load_state_dict(module.state_dict())
        if module.affine:  # the same Parameter objects: an optimiser built before keeps working
            synced.weight, synced.bias = module.weight, module.bias
        return synced.train(module.training)
    for name, child in module.named_children():
        replaced = synchronise_batch_norm(child)
        if replaced is not child:
            setattr(module, name, replaced)
    return module
