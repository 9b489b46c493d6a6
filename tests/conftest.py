import pytest
import torch
from torch.utils.data import DataLoader

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


def stripes(labels: torch.Tensor, size: int = 32) -> torch.Tensor:
    """uint8 (N, 3, size, size) images: class 0 horizontal stripes, class 1 vertical, random phase."""
    i = torch.arange(size)
    phase = torch.randint(0, 8, (len(labels), 1, 1))
    rows = ((i.view(1, -1, 1) + phase) // 4) % 2
    cols = ((i.view(1, 1, -1) + phase) // 4) % 2
    pattern = torch.where(labels.view(-1, 1, 1) == 0, rows.expand(-1, size, size), cols.expand(-1, size, size))
    noise = torch.randint(0, 40, pattern.shape)
    image = (pattern * 170 + 40 + noise).clamp(0, 255).to(torch.uint8)
    return image.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def toy_train_batches(steps: int, source: int = 8, target: int = 8) -> DataLoader:
    """Training batches {"source": (images, labels), "target": images} of the stripes problem."""
    batches = []
    for _ in range(steps):
        labels = torch.randint(0, 2, (source,))
        batches.append({"source": (stripes(labels), labels), "target": stripes(torch.randint(0, 2, (target,)))})
    return DataLoader(batches, batch_size=None)


def toy_eval_batches(count: int = 2, size: int = 16) -> DataLoader:
    batches = []
    for _ in range(count):
        labels = torch.randint(0, 2, (size,))
        batches.append((stripes(labels), labels))
    return DataLoader(batches, batch_size=None)


def quiet_trainer(**options):
    import lightning as L

    defaults = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, accelerator="cpu", devices=1)
    return L.Trainer(**{**defaults, **options})
