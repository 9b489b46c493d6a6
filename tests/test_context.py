"""frozen_stats: running-statistics updates inside the block are discarded, for every layer; sync_norms and
local_statistics switch layers between their own and every process's statistics."""

import copy

import pytest
import torch
from torch import nn

from adamatch_uan.norm import frozen_stats, local_statistics, make_norm, sync_norms, unsync_norms, uses_context


def model(name):
    return nn.Sequential(nn.Conv2d(3, 4, 3), make_norm(name, 4), nn.ReLU(), nn.Conv2d(4, 4, 3), make_norm(name, 4))


def buffers(m):
    return {k: v.clone() for k, v in m.named_buffers()}


@pytest.mark.parametrize("name", ["bn", "mn", "uan"])
def test_frozen_pass_leaves_every_buffer_unchanged_and_a_normal_pass_changes_them(name):
    m = model(name)
    m(torch.randn(8, 3, 9, 9))  # past initial values, e.g. MN's first fit
    before = buffers(m)
    x = torch.randn(8, 3, 9, 9) * 2 + 1
    with frozen_stats(m):
        frozen_out = m(x)
    after = buffers(m)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    m(x)
    changed = [k for k, v in buffers(m).items() if not torch.equal(v, before[k])]
    assert any("running" in k for k in changed), changed
    assert frozen_out.requires_grad


@pytest.mark.parametrize("name", ["bn", "mn", "uan"])
def test_graph_of_a_frozen_pass_can_be_backpropagated_after_a_normal_pass(name):
    m = model(name)
    x = torch.randn(8, 3, 9, 9)
    with frozen_stats(m):
        a = m(x)
    b = m(x)
    (a.square().sum() + b.sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_frozen_stats_restores_even_after_an_exception():
    m = model("bn")
    before = buffers(m)
    with pytest.raises(RuntimeError):
        with frozen_stats(m):
            m(torch.randn(8, 3, 9, 9))
            raise RuntimeError("interrupted")
    assert all(torch.equal(v, before[k]) for k, v in buffers(m).items())


def test_uses_context_is_decided_at_construction():
    assert uses_context(make_norm("uan", 4, num_contexts=2))
    assert not uses_context(make_norm("uan", 4)) and not uses_context(make_norm("bn", 4))


def test_sync_norms_changes_layers_in_place_and_unsync_norms_undoes_it():
    from adamatch_uan.models import make_backbone
    from adamatch_uan.norm.batch import SyncedBatchNorm
    from torchmetrics.classification import MulticlassAccuracy

    torch.manual_seed(0)
    model = nn.Sequential(make_backbone("shallow_cnn", 10, norm={"input": "uan", "norm1": "mn", "default": "bn"},
                                        norm_at=["input", "norm1", "norm2"]), MulticlassAccuracy(10))
    keys, x = list(model.state_dict()), torch.randn(4, 3, 32, 32)
    plain = copy.deepcopy(model)
    sync_norms(model)
    kinds = {type(m).__name__: getattr(m, "sync_stats", None) for m in model.modules()
             if hasattr(m, "sync_stats")}
    assert kinds == {"UAN": True, "MixtureNorm": True, "SyncedBatchNorm": True}
    assert callable(model[1].sync)  # torchmetrics' own `sync` is not a norm flag
    assert list(model.state_dict()) == keys
    torch.manual_seed(1)
    synced_out = model[0](x)
    torch.manual_seed(1)
    torch.testing.assert_close(synced_out, plain[0](x))  # one process: the layers' own statistics
    with local_statistics(model):
        assert not any(getattr(m, "sync_stats", False) for m in model.modules())
    assert all(m.sync_stats for m in model.modules() if hasattr(m, "sync_stats"))
    unsync_norms(model)
    assert not any(isinstance(m, SyncedBatchNorm) for m in model.modules())
    assert not any(getattr(m, "sync_stats", False) for m in model.modules())
    assert list(model.state_dict()) == keys
