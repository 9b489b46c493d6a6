"""The registry and properties every registered norm layer must have."""

import pytest
import torch
from torch import nn

from adamatch_uan.norm import NORMS, BatchNorm, list_norms, make_norm

MIXTURES = ["mn", "uan", "uan_ctx"]
LAYERS = ["bn", *MIXTURES]


def test_unknown_name_lists_the_choices():
    with pytest.raises(ValueError) as err:
        make_norm("layernorm", 8)
    message = str(err.value)
    assert "'layernorm'" in message and "--norm" in message
    for name in list_norms():
        assert name in message


def test_callable_is_used_as_is():
    layer = make_norm(lambda c, **kw: nn.GroupNorm(2, c, **kw), 8, eps=1e-3)
    assert isinstance(layer, nn.GroupNorm) and layer.eps == 1e-3


def test_names_and_options_reach_the_layer():
    assert list_norms() == sorted(NORMS)
    assert isinstance(make_norm("bn", 8, momentum=0.001), BatchNorm)
    assert make_norm("uan", 8, num_components=5).num_components == 5
    assert make_norm("uan_ctx", 8).num_contexts == 2
    assert isinstance(make_norm("none", 8), nn.Identity)


@pytest.mark.parametrize("name", MIXTURES)
@pytest.mark.parametrize("shape", [(16, 5), (8, 5, 6, 7)])
def test_one_component_equals_torch_batchnorm_in_training(name, shape):
    layer = make_norm(name, 5, num_components=1)
    reference = nn.BatchNorm1d(5) if len(shape) == 2 else nn.BatchNorm2d(5)
    gamma, beta = torch.randn(5), torch.randn(5)
    with torch.no_grad():
        for m in (layer, reference):
            m.weight.copy_(gamma)
            m.bias.copy_(beta)
    x = torch.randn(shape) * 3 + 1
    torch.testing.assert_close(layer(x), reference(x), rtol=1e-5, atol=1e-5)


def inputs():
    big = torch.randn(8, 4, 5, 5).sign() * 1e4
    constant = torch.randn(8, 4, 5, 5)
    constant[:, 1] = 3.0
    return {"zeros": torch.zeros(8, 4, 5, 5), "constant channel": constant, "±1e4": big,
            "±1e4 plus noise": big + torch.randn_like(big), "batch of one": torch.randn(1, 4, 5, 5),
            "2-D": torch.randn(8, 4)}


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("case", list(inputs()))
def test_finite_forward_and_backward_for_hard_inputs(name, case):
    layer = make_norm(name, 4)
    x = inputs()[case].requires_grad_(True)
    for mode in (True, False):
        layer.train(mode)
        y = layer(x)
        (y * torch.randn_like(y)).sum().backward()
        assert torch.isfinite(y).all() and torch.isfinite(x.grad).all(), (case, mode)
        for name_, p in layer.named_parameters():
            assert torch.isfinite(p.grad).all(), (case, mode, name_)
        for name_, b in layer.named_buffers():
            assert torch.isfinite(b.float()).all(), (case, mode, name_)


@pytest.mark.parametrize("name", LAYERS)
def test_batch_statistic_of_a_single_value_is_a_clear_error(name):
    layer = make_norm(name, 4)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, 4))
    layer.eval()
    assert torch.isfinite(layer(torch.randn(1, 4))).all()


@pytest.mark.parametrize("name", LAYERS)
def test_bf16_autocast_keeps_input_dtype_and_float32_statistics(name):
    layer = make_norm(name, 4)
    x = torch.randn(8, 4, 6, 6)
    expected = make_norm(name, 4)
    expected.load_state_dict(layer.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    y.float().sum().backward()
    torch.testing.assert_close(y.float(), expected(x.bfloat16().float()), rtol=2e-2, atol=2e-2)
    for buf in layer.buffers():
        assert buf.dtype in (torch.float32, torch.int64)
