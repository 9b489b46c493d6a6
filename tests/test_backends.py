"""The dispatcher: which backend serves a call, and the layers without the compiled kernel."""

import pytest
import torch

from adamatch_uan.norm import backends, make_norm
from adamatch_uan.norm.backends import build, cpu_kernel


def test_backends_are_named_per_device_and_k(monkeypatch):
    assert backends.backend("cpu", 9) == "torch ops (K > 8)" and backends.backend("cuda", 9) == "torch ops (K > 8)"
    monkeypatch.setattr(backends, "_triton", lambda: object())
    assert backends.backend("cuda", 3) == "the Triton kernels"
    monkeypatch.setattr(backends, "_triton", lambda: None)
    assert backends.backend("cuda", 3).startswith("torch ops")
    monkeypatch.setattr(cpu_kernel, "ops", lambda: None)
    assert "failed to build" in backends.backend("cpu", 3)


def test_layers_run_on_torch_ops_without_the_kernel(monkeypatch):
    monkeypatch.setattr(cpu_kernel, "ops", lambda: None)
    layer = make_norm("uan", 4)
    x = torch.randn(16, 4, 3, 3, requires_grad=True)
    layer(x).sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("k", [1, 2, backends.MAX_COMPONENTS])  # 2: its one-exponential softmax
def test_the_kernel_serves_every_k_the_dispatcher_sends_it_as_torch_ops_would(k):
    """The kernel's own limit is the dispatcher's (build.py hands it over): a kernel built for fewer
    components would fail the call at K = MAX_COMPONENTS."""
    assert f"-DMIX_MAX_K={backends.MAX_COMPONENTS}" in build.FLAGS
    assert backends.backend("cpu", k) == "the compiled CPU kernel"
    torch.manual_seed(0)
    layer = make_norm("uan", 4, num_components=k).double()
    x = torch.randn(16, 4, 3, 3, dtype=torch.float64, requires_grad=True)

    def transform():
        y = layer(x)
        return (y, *torch.autograd.grad((y * y.detach().cos()).sum(), [x, *layer.parameters()]))

    kernel = transform()
    with backends.torch_ops_only():
        assert backends.backend("cpu", k).startswith("torch ops")
        ops = transform()
    for a, b in zip(kernel, ops):
        torch.testing.assert_close(a, b)
