"""Batches formed on the device: the whole split as uint8 tensors in device memory, a batch is one
indexing operation (airbench keeps CIFAR-10 on the GPU the same way). No workers, no collation,
no host-to-device copy per step. The same code runs on CPU (the tensors stay where they are) and
CUDA; augmentation then runs on whole batches in the training step (`augment.augment_batch`).

The shuffled order comes from `EpochPermutation`, which the DataLoader path uses as its sampler
too, so both paths see the same batches for the same seed and epoch.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Sampler
from torch.utils.data._utils.collate import default_collate


def collate(batch):
    """The DataLoader path's batches: those from `ArrayDataset.__getitems__` are ready, lists of
    samples are stacked."""
    return batch if isinstance(batch, tuple) else default_collate(batch)


class EpochPermutation(Sampler):
    """A random order of range(n) fixed by (seed, epoch); Lightning calls `set_epoch`."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self):
        return iter(self.order().tolist())

    def __len__(self) -> int:
        return self.n


class DeviceBatches:
    """An iterable of (images, labels) batches sliced from tensors moved once to `device`.

    `sampler`: an EpochPermutation for a shuffled split, None for the fixed order. With several
    processes (DDP), each takes every `world`-th index of the padded order, as DistributedSampler
    does, so every rank runs the same number of steps.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        sampler: EpochPermutation | None = None,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world: int = 1,
    ):
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.batch_size, self.sampler = int(batch_size), sampler
        # Lightning reads `sampler` (it calls set_epoch) and `batch_sampler`, as on a DataLoader
        self.batch_sampler = None
        self.rank, self.world = rank, world
        self.device = torch.device(device)

    def indices(self) -> torch.Tensor:
        n = len(self.labels)
        order = self.sampler.order() if self.sampler is not None else torch.arange(n)
        if self.world > 1:
            total = math.ceil(n / self.world) * self.world
            order = torch.cat([order, order[: total - n]])[self.rank :: self.world]
        return order

    def __len__(self) -> int:
        return math.ceil(math.ceil(len(self.labels) / self.world) / self.batch_size)

    def __iter__(self):
        order = self.indices().to(self.device)
        for i in range(0, len(order), self.batch_size):
            idx = order[i : i + self.batch_size]
            # index_select, not images[idx]: on the CPU it gathers uint8 rows ~15x faster
            yield self.images.index_select(0, idx), self.labels.index_select(0, idx)

    def nbytes(self) -> int:
        return self.images.nbytes + self.labels.nbytes
