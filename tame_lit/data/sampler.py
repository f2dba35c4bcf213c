"""Samplers: the evaluation's split of the images over processes, and the training order that can be resumed
exactly from any batch (``ShuffledSampler``, ``SeededItems``, ``ResumableLoader``)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


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


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one image's augmentation in one epoch: a function of these three numbers only, so the same
    crop and flip come out whichever process, worker or resumed run draws the image."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # torch.manual_seed takes up to 2**63 - 1


class ShuffledSampler(DistributedSampler):
    """The training order: each epoch a permutation drawn from ``seed + epoch`` (torch's ``DistributedSampler``:
    split ``rank::num_replicas``, padded to equal shares), each index paired with its ``item_seed``.

    One process with batch ``B`` sees, batch by batch, the union of what ``n`` processes with batch ``B / n``
    see, with the same augmentations. ``start`` skips that many of this process's samples once, in the next
    iteration only: the part of an epoch a resumed run has already trained on.
    """

    def __init__(
        self, dataset: Dataset, seed: int | None = None, num_replicas: int | None = None, rank: int | None = None
    ) -> None:
        if num_replicas is None or rank is None:
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            num_replicas = torch.distributed.get_world_size() if distributed else 1
            rank = torch.distributed.get_rank() if distributed else 0
        if seed is None:  # the run's seed, as Lightning's own distributed sampler takes it
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.start = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        start, self.start = self.start, 0
        seed, epoch = self.seed, self.epoch
        return ((index, item_seed(seed, epoch, index)) for index in list(super().__iter__())[start:])

    def __len__(self) -> int:
        return self.num_samples


class SeededItems(Dataset):
    """``dataset`` read by ``(index, seed)`` keys: each item's random transforms draw from ``seed`` alone (the
    global generator of the worker or process is restored after)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


class ResumableLoader(DataLoader):
    """The training loader, resumable mid-epoch: ``position()`` (the DataModule saves it in every checkpoint)
    given back to ``resume_from`` makes the next iteration train on the rest of the interrupted epoch, in its
    order and with its augmentations, skipping what was trained on without reading it. Needs a
    ``ShuffledSampler`` over ``SeededItems``.

    Iterating starts nothing until the first batch is asked for (no worker, no permutation): Lightning creates
    the iterator before it sets the sampler's epoch, and before a resumed run's position is known."""

    sampler: ShuffledSampler

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, ShuffledSampler) or not isinstance(self.dataset, SeededItems):
            raise TypeError("ResumableLoader needs a ShuffledSampler over a SeededItems dataset")
        self.served = 0  # batches of the current epoch handed out
        self._resume_at = 0

    def __iter__(self) -> Iterator[Any]:
        self.served, self._resume_at = self._resume_at, 0
        self.sampler.start = self.served * int(self.batch_size or 1)
        for batch in super().__iter__():
            self.served += 1
            yield batch

    def position(self) -> dict[str, int]:
        """Where training is: the epoch, the seed and the batches of the epoch handed out (and what they need)."""
        return {
            "epoch": int(self.sampler.epoch),
            "seed": int(self.sampler.seed),
            "batches": self.served,
            "batch_size": int(self.batch_size or 1),
            "processes": int(self.sampler.num_replicas),
            "samples": len(self.dataset),
        }

    def resume_from(self, state: dict[str, int]) -> None:
        """Continue the saved epoch after its ``batches`` (or start the next one when it was finished); the same
        per-process batch, number of processes and images are needed for the same order, so a change is refused
        naming what changed."""
        now = {"batch_size": int(self.batch_size or 1), "processes": int(self.sampler.num_replicas),
               "samples": len(self.dataset)}  # fmt: skip
        changed = {key: (state[key], value) for key, value in now.items() if key in state and state[key] != value}
        if changed:
            shown = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changed.items())
            raise ValueError(
                f"the training data changed since the checkpoint ({shown}; data.batch_size, the number of "
                "processes, the training images): the interrupted epoch cannot continue in its order. Resume with "
                "the checkpoint's settings, or start a new run"
            )
        self.sampler.seed = int(state["seed"])
        finished = int(state["batches"]) >= len(self)
        self.sampler.set_epoch(int(state["epoch"]) + int(finished))
        self._resume_at = 0 if finished else int(state["batches"])
