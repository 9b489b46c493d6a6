"""The Triton passes against the torch-ops backend (float64) on tiny shapes; on a machine without a GPU
they run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set by conftest.py)."""

import itertools
from copy import deepcopy

import pytest
import torch

pytest.importorskip("triton")

from adamatch_uan.norm.backends import torch_ops  # noqa: E402
from adamatch_uan.norm.backends import triton_ops  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# batch statistics (training) and given ones (evaluation), UAN's parametrisation and MN's
VARIANTS = [("batch", "uan"), ("given", "uan"), ("batch", "mn")]
# every (P, K, G) once, the variants in turn (each variant meets every P, K and G; the interpreter is slow)
CASES = [(p, k, g, *VARIANTS[(a + b + c) % len(VARIANTS)])
         for (a, p), (b, k), (c, g) in itertools.product(enumerate([1, 7, 64]), enumerate([1, 2, 3]), enumerate([1, 2]))]


def problem(p, k, groups, stats, parametrised, n=6, c=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(p * 100 + k * 10 + groups)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)  # noqa: E731
    x = (rand(n, c, p) * 1.5 + 0.3).to(DEVICE)
    ctx = (torch.arange(n) % groups).to(DEVICE) if groups > 1 else None
    mu = rand(k, c).to(DEVICE)
    if parametrised == "uan":
        weight_param, var_param, floors = rand(groups, k, c), rand(k, c), (0.01, 0.05)
    else:
        weight_param = torch.log_softmax(rand(groups, k, c), 1)
        var_param, floors = rand(k, c).abs() + 0.2, None
    gamma, beta = rand(c) + 1, rand(c)
    alpha, delta2 = (rand(k, c), rand(k, c).abs() + 0.1) if stats == "given" else (None, None)
    tables = [t.to(DEVICE) for t in (weight_param, mu, var_param, gamma, beta)]
    given = [t.to(DEVICE) if t is not None else None for t in (alpha, delta2)]
    floor = (rand(c).abs() * 0.3).to(DEVICE)
    return x, ctx, floors, tables, given, floor


def run(node, x, ctx, floors, tables, given, floor, running=None):
    x = x.clone().requires_grad_(True)
    params = [t.clone().requires_grad_(True) for t in tables]
    given = [t.clone().requires_grad_(True) if t is not None else None for t in given]
    out = node(x, ctx, 1e-3, floors, running, True, *params, *given, floor)
    upstream = torch.randn(out[0].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    upstream = upstream.to(DEVICE, x.dtype)
    (out[0] * upstream).sum().backward()
    grads = [x.grad] + [p.grad for p in params] + [t.grad for t in given if t is not None]
    return out, grads


@pytest.mark.parametrize("p, k, groups, stats, parametrised", CASES,
                         ids=["-".join(map(str, case)) for case in CASES])
def test_triton_passes_equal_torch_ops(p, k, groups, stats, parametrised):
    problem_ = problem(p, k, groups, stats, parametrised)
    reference, reference_grads = run(torch_ops.TorchTransform.apply, *problem_)
    got, got_grads = run(triton_ops.transform, *problem_)
    assert len(got) == len(reference)
    for a, b in zip(got, reference):
        torch.testing.assert_close(a, b)
    for a, b in zip(got_grads, reference_grads):
        torch.testing.assert_close(a, b)


def test_float32_statistics_match_float64():
    x, ctx, floors, tables, given, floor = problem(7, 3, 2, "batch", "uan")
    reference, reference_grads = run(torch_ops.TorchTransform.apply, x, ctx, floors, tables, given, floor)
    single = [t.float() for t in tables]
    got, got_grads = run(triton_ops.transform, x.float(), ctx, floors, single, given, floor.float())
    torch.testing.assert_close(got[0].double(), reference[0], rtol=1e-4, atol=1e-4)
    for a, b in zip(got_grads, reference_grads):
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-4)


def test_running_averages_update_as_on_torch_ops():
    x, ctx, floors, tables, given, floor = problem(7, 3, 1, "batch", "uan")
    k, c = tables[1].shape
    runs = []
    for node in (torch_ops.TorchTransform.apply, triton_ops.transform):
        mean, var = torch.zeros(k, c, dtype=x.dtype, device=DEVICE), torch.ones(k, c, dtype=x.dtype, device=DEVICE)
        run(node, x, ctx, floors, tables, given, floor, running=(mean, var, 0.1))
        runs.append((mean, var))
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("groups", [1, 2])
def test_sums_and_their_gradient_equal_torch_ops(groups):
    x, ctx, floors, tables, _, _ = problem(7, 3, groups, "batch", "uan")
    results = []
    for sums in (torch_ops.sums, triton_ops.sums):
        xs = x.clone().requires_grad_(True)
        weight, mu, var = (t.clone().requires_grad_(True) for t in (tables[0], tables[1], tables[2]))
        s, shift = sums(xs, ctx, floors, weight, mu, var)
        upstream = torch.randn(s.shape, generator=torch.Generator().manual_seed(2), dtype=x.dtype).to(DEVICE)
        (s * upstream).sum().backward()
        results.append([s, shift, xs.grad, weight.grad, mu.grad, var.grad])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_an_empty_batch_gives_zero_sums():
    x, ctx, floors, tables, _, _ = problem(7, 2, 1, "batch", "uan")
    s, shift = triton_ops.sums(x[:0], None, floors, tables[0], tables[1], tables[2])
    assert s.abs().sum() == 0 and shift.abs().sum() == 0


@pytest.mark.parametrize("name", ["uan", "uan_ctx", "mn"])
def test_a_layer_on_the_dispatcher_takes_the_triton_path_and_trains_alike(name, monkeypatch):
    from adamatch_uan.norm import backends as kernel
    from adamatch_uan.norm import make_norm

    torch.manual_seed(0)
    layer = make_norm(name, 3, max_samples=10**6).double().to(DEVICE)
    x = torch.randn(6, 3, 5, 5, dtype=torch.float64, device=DEVICE)
    ctx = (torch.arange(6) % 2).to(DEVICE)
    results = []
    for uses_triton in (False, True):
        monkeypatch.setattr(kernel, "_uses_triton", lambda x, mu, on=uses_triton: on)
        monkeypatch.setattr(kernel, "_uses_kernel", lambda x, mu: False)
        copy = deepcopy(layer)
        xs = x.clone().requires_grad_(True)
        y = copy(xs, ctx) if name == "uan_ctx" else copy(xs)
        y.square().sum().backward()
        results.append([y, xs.grad, *[p.grad for p in copy.parameters()], *copy.state_dict().values()])
    for a, b in zip(*results):
        if a is not None:
            torch.testing.assert_close(a, b)


def test_the_self_check_passes_on_the_triton_kernels():
    from adamatch_uan.norm import backends

    assert backends.self_check(triton_ops, DEVICE) is None


@pytest.mark.parametrize("failure", ["raises", "wrong"])
def test_a_failed_self_check_warns_once_and_falls_back_to_torch_ops(monkeypatch, failure):
    from adamatch_uan.norm import backends

    def broken(*args):  # a launch that fails, or kernels that compute something else
        if failure == "raises":
            raise RuntimeError("simulated launch failure")
        return tuple(t * 1.01 for t in torch_ops.TorchTransform.apply(*args))

    monkeypatch.setattr(triton_ops, "transform", broken)
    monkeypatch.delenv("ADAMATCH_UAN_TRITON", raising=False)
    backends._triton.cache_clear()
    try:
        with pytest.warns(UserWarning, match=r"(?s)self-check.*Cause: .*(simulated launch failure|differ).*ADAMATCH_UAN_TRITON=0"):
            assert backends._triton() is None
        assert backends._triton() is None  # cached: warned once
        assert backends.backend("cuda", 3).startswith("torch ops")
        monkeypatch.setenv("ADAMATCH_UAN_TRITON", "1")
        backends._triton.cache_clear()
        with pytest.raises(backends.TritonCheckError, match="self-check"):
            backends._triton()
    finally:
        backends._triton.cache_clear()
