"""Evaluation data split over processes (DDP) without the padding of torch's DistributedSampler."""

from __future__ import annotations

from collections.abc import Iterator

import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset


class UnpaddedShards(DistributedSampler):
    """Process r of W evaluates samples r, r + W, r + 2W, ...: every sample exactly once overall.

    torch's ``DistributedSampler`` repeats samples so every process has as many, which counts
    them twice in synced metrics; the metrics here are sums over samples (torchmetrics), so
    uneven shards give the exact result. A ``DistributedSampler``, so Lightning leaves it in place.
    """

    def __init__(self, dataset, num_replicas: int | None = None, rank: int | None = None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = len(range(self.rank, len(dataset), self.num_replicas))
        self.total_size = len(dataset)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))


def evaluation_loader(images: Tensor, labels: Tensor, batch_size: int) -> DataLoader:
    """(images, labels) in order, in batches; this process's shard when there are several."""
    dataset = TensorDataset(images, labels)
    several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    return DataLoader(dataset, batch_size=batch_size, sampler=UnpaddedShards(dataset) if several else None)
