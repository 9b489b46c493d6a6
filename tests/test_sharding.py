"""Evaluation shards: every sample exactly once over the processes, in order, none repeated."""

import pytest
import torch
from torch.utils.data import TensorDataset

from adamatch_uan.data.sharding import UnpaddedShards, evaluation_loader


@pytest.mark.parametrize("n, world", [(10, 2), (7, 3), (2, 4), (0, 2)])
def test_shards_cover_every_sample_once(n, world):
    dataset = TensorDataset(torch.arange(n))
    shards = [list(UnpaddedShards(dataset, num_replicas=world, rank=r)) for r in range(world)]
    assert sorted(i for shard in shards for i in shard) == list(range(n))
    assert [len(UnpaddedShards(dataset, num_replicas=world, rank=r)) for r in range(world)] == list(map(len, shards))


def test_one_process_evaluates_everything_in_order():
    loader = evaluation_loader(torch.arange(5), torch.zeros(5, dtype=torch.long), batch_size=2)
    assert torch.cat([x for x, _ in loader]).tolist() == [0, 1, 2, 3, 4]
