"""The dispatcher: which backend serves a call, and the layers without the compiled kernel."""

import torch

from adamatch_uan.norm import backends, make_norm
from adamatch_uan.norm.backends import cpu_kernel


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
