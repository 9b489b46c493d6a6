"""The compiled kernel as registered operators: opcheck, and what tracing, torch.export and torch.compile see."""

import copy
import warnings

import pytest
import torch
from torch import nn

from adamatch_uan.norm import backends, make_norm
from adamatch_uan.norm.backends import cpu_kernel

pytestmark = pytest.mark.skipif(not backends.kernel_available(), reason="no C++ compiler: the compiled kernel is unavailable")


def tables(K: int, C: int, G: int, given: bool) -> tuple:
    def leaf(*shape, low=None):
        t = torch.rand(*shape, dtype=torch.float64) + low if low is not None else torch.randn(*shape, dtype=torch.float64)
        return t.requires_grad_()

    return (leaf(G, K, C), leaf(K, C), leaf(K, C), leaf(C, low=0.5), leaf(C),
            leaf(K, C) if given else None, leaf(K, C, low=0.1) if given else None)


@pytest.mark.parametrize("given", [False, True])
@pytest.mark.parametrize("cache_bytes", [0, 1 << 20])
def test_forward_operator_passes_opcheck(given, cache_bytes):
    x = torch.randn(6, 3, 5, dtype=torch.float64, requires_grad=True)
    weight, mu, var, gamma, beta, alpha, delta2 = tables(2, 3, 2, given)
    floor = torch.full((3,), 0.05, dtype=torch.float64)
    args = (x, torch.tensor([0, 1, 0, 1, 1, 0]), weight, mu, var, gamma, beta, alpha, delta2, floor, 1e-3, 0.01, 1e-3,
            True, cache_bytes)
    result = torch.library.opcheck(torch.ops.adamatch_uan.mixture_forward.default, args)
    assert set(result.values()) == {"SUCCESS"}, result


def test_sums_operator_passes_opcheck():
    x = torch.randn(6, 3, 5, dtype=torch.float64, requires_grad=True)
    weight, mu, raw_var, *_ = tables(3, 3, 1, False)
    var = (raw_var.detach().exp() + 0.1).requires_grad_()  # σ² itself, without UAN's parametrisation
    result = torch.library.opcheck(torch.ops.adamatch_uan.mixture_sums.default, (x, None, weight, mu, var, 0.0, 0.0, False))
    assert set(result.values()) == {"SUCCESS"}, result


def test_fake_workspace_has_the_kernels_size():
    for n, cache in ((4, 1 << 20), (64, 0)):
        x = torch.randn(n, 3, 5)
        weight, mu, var, gamma, beta = (t.float().detach() for t in tables(2, 3, 2, False)[:5])
        _, _, work = torch.ops.adamatch_uan.mixture_forward(x, None, weight, mu, var, gamma, beta, None, None, None,
                                                            1e-5, 0.0, 0.0, True, cache)
        assert work.numel() == cpu_kernel.workspace_size(x, mu, 2, True, True, cache)


def small_model(norm: str) -> nn.Module:
    """conv → norm → ReLU → linear, with a context-aware norm given the context."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm, self.head = nn.Conv2d(3, 8, 3), make_norm(norm, 8), nn.Linear(8 * 6 * 6, 4)

        def forward(self, x, context=None):
            h = self.norm(self.conv(x), context) if context is not None else self.norm(self.conv(x))
            return self.head(h.relu().flatten(1))

    return Net()


def trained(norm: str) -> nn.Module:
    torch.manual_seed(0)
    model = small_model(norm)
    for _ in range(3):  # running statistics away from their start
        model(torch.randn(16, 3, 8, 8) * 2 + 1, *([torch.arange(16) % 2] if norm == "uan_ctx" else []))
    return model.eval()


@pytest.mark.parametrize("norm", ["uan", "uan_ctx", "mn"])
def test_tracing_an_evaluated_model_records_the_operator_and_is_exact_on_other_inputs(norm):
    model = trained(norm)
    extra = (torch.zeros(4, dtype=torch.long),) if norm == "uan_ctx" else ()
    with warnings.catch_warnings():
        # torch.jit.trace's deprecation, and its warnings about K and the shapes, which are constants
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (torch.randn(4, 3, 8, 8), *extra))
    assert "adamatch_uan::mixture_forward" in str(traced.inlined_graph)
    x = torch.randn(10, 3, 8, 8)
    context = (torch.ones(10, dtype=torch.long),) if norm == "uan_ctx" else ()
    assert torch.equal(traced(x, *context), model(x, *context))


def test_torch_export_records_the_operator_and_is_exact_for_any_batch():
    model = trained("uan_ctx")
    example = (torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, example, dynamic_shapes=({0: batch}, {0: batch}))
    assert "adamatch_uan.mixture_forward" in str(program.graph)
    x, context = torch.randn(9, 3, 8, 8), torch.ones(9, dtype=torch.long)
    assert torch.equal(program.module()(x, context), model(x, context))


@pytest.mark.parametrize("norm", ["uan", "mn"])
def test_torch_compile_trains_as_eager(norm):
    eager = small_model(norm)
    compiled_copy = copy.deepcopy(eager)
    compiled = torch.compile(compiled_copy)
    x = torch.randn(16, 3, 8, 8)
    outputs = []
    for model in (eager, compiled):
        torch.manual_seed(1)  # MN's EM draws its subsample
        y = model(x)
        y.square().sum().backward()
        outputs.append(y)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(eager.named_parameters(), compiled_copy.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    for (name, b), c in zip(eager.named_buffers(), compiled_copy.buffers()):  # running averages written alike
        torch.testing.assert_close(c, b, msg=name)
    eager.eval(), compiled_copy.eval()
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)


def test_a_second_derivative_fails_loudly():
    layer = make_norm("uan", 3)
    x = torch.randn(8, 3, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="differentiated twice"):
        torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)


def test_bfloat16_storage_computes_in_float32_and_rounds_once():
    """x, y and the gradients in bfloat16, every statistic in float32: the statistics are those of the same
    values in float32 (to float32's rounding: the two builds may order a sum differently), and the output is
    the float32 output rounded to bfloat16 (one rounding: within one bfloat16 step)."""
    ops = cpu_kernel.ops()
    x16 = (torch.randn(6, 3, 40) * 2 + 1).bfloat16()
    weight, mu, var, gamma, beta = (t.float().detach() for t in tables(2, 3, 1, False)[:5])
    args = (None, weight, mu, var, gamma, beta, None, None, None, 1e-5, 0.01, 1e-3, True, 1 << 20)
    y16, stats16, _ = ops.mixture_forward(x16, *args)
    y32, stats32, _ = ops.mixture_forward(x16.float(), *args)
    assert y16.dtype == torch.bfloat16 and stats16.dtype == torch.float32
    torch.testing.assert_close(stats16, stats32, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y16.float(), y32.bfloat16().float(), rtol=2**-8, atol=1e-6)
    result = torch.library.opcheck(ops.mixture_forward.default, (x16, *args), test_utils=("test_schema", "test_faketensor"))
    assert set(result.values()) == {"SUCCESS"}, result


def test_bfloat16_sums_and_their_gradient_equal_float32s():
    """The distributed path's sums and the stats pass's backward from dL/dS (a float32 table) on a bfloat16
    input: the float32 values' sums and parameter gradients, ∂L/∂x rounded once to bfloat16."""
    x16 = (torch.randn(6, 3, 40) * 2 + 1).bfloat16()
    weight, mu, var = (t.float().detach() for t in tables(2, 3, 1, False)[:3])
    g_sums = torch.randn(3, 2, 3, generator=torch.Generator().manual_seed(0))
    results = []
    for x in (x16, x16.float()):
        inputs = [t.clone().requires_grad_() for t in (x, weight, mu, var)]
        s, shift = cpu_kernel.sums(inputs[0], None, (0.01, 1e-3), *inputs[1:])
        results.append((s, shift, *torch.autograd.grad((s * g_sums).sum(), inputs)))
    (s16, shift16, dx16, *params16), (s32, shift32, dx32, *params32) = results
    assert s16.dtype == torch.float32 and dx16.dtype == torch.bfloat16
    torch.testing.assert_close((s16, shift16), (s32, shift32), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(dx16.float(), dx32.bfloat16().float(), rtol=2**-7, atol=1e-6)
    torch.testing.assert_close(params16, params32, rtol=1e-5, atol=1e-5)
