"""frozen_stats: running-statistics updates inside the block are discarded, for every layer."""

import pytest
import torch
from torch import nn

from adamatch_uan.norm import frozen_stats, make_norm, uses_context


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
