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


def assert_close_to_scale(got, want, rel, name=""):
    """|got − want| ≤ rel × max|want| everywhere: sums over many terms (a parameter's gradient) that nearly
    cancel differ by their terms' rounding, which is small against the tensor's scale, not the entry's."""
    gap, scale = (got.float() - want.float()).abs().max(), want.float().abs().max()
    assert gap <= rel * scale + 1e-7, f"{name}: max |Δ| {gap:.3g} against a scale of {scale:.3g}"


def layer_step(layer, x, context):
    """Training-mode forward and backward of a copy of ``layer``: y, ∂L/∂x and every parameter's gradient."""
    import copy

    layer = copy.deepcopy(layer).train()
    x = x.detach().requires_grad_()
    y = layer(x, context) if context is not None else layer(x)
    (y.float().square() * torch.linspace(0.5, 1.5, y.numel()).view_as(y)).sum().backward()
    return y, x.grad, [p.grad for p in layer.parameters()], layer


@pytest.mark.parametrize("name", LAYERS)
def test_channels_last_gives_the_nchw_result_in_channels_last(backend, name):
    torch.manual_seed(0)
    layer = make_norm(name, 6, **({"max_samples": 10**6} if name != "bn" else {}))  # every position: no random draw
    x = torch.randn(8, 6, 5, 7) * 2 + 1
    context = torch.arange(8) % 2 if name == "uan_ctx" else None
    y, gx, grads, trained = layer_step(layer, x, context)
    y_cl, gx_cl, grads_cl, trained_cl = layer_step(layer, x.contiguous(memory_format=torch.channels_last), context)
    assert y_cl.is_contiguous(memory_format=torch.channels_last) and not y_cl.is_contiguous()  # written NHWC
    torch.testing.assert_close(y_cl, y, rtol=1e-5, atol=1e-5)
    # ∂L/∂x adds parts that nearly cancel (the direct one and the chains through τ and the statistics), so
    # its rounding is held to the tensor's scale, with test_mixture.py's float32 bound (2e-5).
    assert_close_to_scale(gx_cl, gx, 2e-5, "∂L/∂x")
    for a, b in zip(grads_cl, grads):  # float32 sums in another order
        assert_close_to_scale(a, b, 1e-4, "a parameter's gradient")
    for (key, a), b in zip(trained_cl.state_dict().items(), trained.state_dict().values()):  # running statistics
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=key)
    trained.eval(), trained_cl.eval()
    with torch.no_grad():
        args = (context,) if context is not None else ()
        torch.testing.assert_close(trained_cl(x.contiguous(memory_format=torch.channels_last), *args),
                                   trained(x, *args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("name", LAYERS)
def test_bfloat16_inputs_give_the_float32_result_to_bfloat16_precision(backend, name, memory_format):
    """Statistics in float32 whatever the input's dtype: a bf16 input's output and gradients are the float32
    layer's on the same (bf16-rounded) values, to bf16's precision: 2⁻⁸ relative per element (2 % allowed),
    and for gradients, sums of such terms, 4 % of the tensor's scale (torch's BatchNorm is 2.3 % off here)."""
    torch.manual_seed(0)
    layer = make_norm(name, 6, **({"max_samples": 10**6} if name != "bn" else {}))
    x = (torch.randn(8, 6, 5, 7) * 2 + 1).bfloat16().float()  # values bf16 holds exactly
    context = torch.arange(8) % 2 if name == "uan_ctx" else None
    y, gx, grads, _ = layer_step(layer, x.contiguous(memory_format=memory_format), context)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, gx16, grads16, _ = layer_step(layer, x.bfloat16().contiguous(memory_format=memory_format), context)
    assert y16.dtype == torch.bfloat16 and gx16.dtype == torch.bfloat16
    assert torch.isfinite(y16.float()).all() and torch.isfinite(gx16.float()).all()
    torch.testing.assert_close(y16.float(), y, rtol=0.02, atol=0.02)
    assert_close_to_scale(gx16, gx, 0.04, "∂L/∂x")
    for a, b in zip(grads16, grads):
        assert_close_to_scale(a, b, 0.04, "a parameter's gradient")
