"""Building and loading the compiled mixture kernel (its numerics are tested in test_mixture.py)."""

import pytest
import torch

from adamatch_uan.norm import kernel, make_norm


def test_a_failed_build_warns_and_falls_back_to_torch_ops(tmp_path, monkeypatch):
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(kernel, "_SOURCES", [broken])
    monkeypatch.setenv("ADAMATCH_UAN_CACHE", str(tmp_path / "cache"))
    with pytest.warns(UserWarning, match="Building the mixture kernel failed"):
        assert kernel._extension.__wrapped__() is None


def test_the_environment_can_turn_the_kernel_off(monkeypatch):
    monkeypatch.setenv("ADAMATCH_UAN_KERNEL", "0")
    assert kernel._extension.__wrapped__() is None


def test_layers_run_on_torch_ops_without_the_kernel(monkeypatch):
    monkeypatch.setattr(kernel, "_extension", lambda: None)
    layer = make_norm("uan", 4)
    x = torch.randn(16, 4, 3, 3, requires_grad=True)
    layer(x).sum().backward()
    assert torch.isfinite(x.grad).all()
