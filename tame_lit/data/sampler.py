"""A distributed sampler for evaluation that gives every image to exactly one process, without padding."""

from __future__ import annotations

from torch.utils.data import Dataset, DistributedSampler


class EvenlySplitSampler(DistributedSampler):
    """Each process gets indices ``rank::world_size`` of the dataset, in order, none repeated.

    torch's ``DistributedSampler`` pads the last round with repeated images so every process has as many;
    evaluation then counts those images twice. Metrics with sum states need every image exactly once.
    """

    def __init__(self, dataset: Dataset, num_replicas: int | None = None, rank: int | None = None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = len(range(self.rank, len(dataset), self.num_replicas))
        self.total_size = len(dataset)

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))
