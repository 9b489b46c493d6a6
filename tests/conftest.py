import pytest
import torch

from adamatch_uan.norm import kernel


@pytest.fixture(params=["kernel", "torch"])
def backend(request, monkeypatch):
    """Run a test on the compiled CPU kernel and on the torch-ops backend."""
    if request.param == "kernel":
        if not kernel.kernel_available():
            pytest.skip("no C++ compiler: the compiled kernel is unavailable")
    else:
        monkeypatch.setattr(kernel, "_uses_kernel", lambda x, mu: False)
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
