import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

# Without a GPU the Triton kernels run in Triton's CPU interpreter (read when they are defined).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from adamatch_uan.norm import backends  # noqa: E402

# A worker of pytest-xdist (one per core) and the runs it launches get one thread each: more
# threads than cores make OpenMP's workers spin against each other and slow every test.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
MNIST_FILES = [f"MNIST/raw/{name}" for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")]
USPS_NPZ = "USPS/usps_esl_16x16.npz"


def needs_shared(*files: str):
    """Skip a test unless every file it reads is in ../shared/data (naming the missing ones)."""
    missing = [f for f in files if not (SHARED / f).is_file()]
    return pytest.mark.skipif(bool(missing), reason=f"../shared/data lacks {', '.join(missing)}")


@pytest.fixture(params=["kernel", "torch"])
def backend(request, monkeypatch):
    """Run a test on the compiled CPU kernel and on the torch-ops backend."""
    if request.param == "kernel":
        if not backends.kernel_available():
            pytest.skip("no C++ compiler: the compiled kernel is unavailable")
    else:
        monkeypatch.setattr(backends, "_uses_kernel", lambda x, mu: False)
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _decoded_images_cache(tmp_path_factory, monkeypatch):
    """Decoded image folders go to a temporary cache, never the user's (in-process loads)."""
    from adamatch_uan.data import image_folders

    folder = tmp_path_factory.mktemp("decoded")
    monkeypatch.setattr(image_folders, "cache_dir", lambda: folder)


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


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """Generated npz domains: source 28×28, target 16×16 (USPS-sized), 200 images of 10 classes each."""
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    np.savez(folder / "s.npz", x=rng.integers(0, 256, (200, 28, 28), dtype=np.uint8), y=np.arange(200) % 10)
    np.savez(folder / "t.npz", x=rng.integers(0, 256, (200, 16, 16), dtype=np.uint8), y=np.arange(200) % 10)
    return folder


def fit(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adamatch_uan.fit", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def smoke_args(data: Path, run: Path, steps: int) -> list[str]:
    return ["--config", str(ROOT / "configs" / "smoke.yaml"), "--data.source", f"npz:{data / 's.npz'}",
            "--data.target", f"npz:{data / 't.npz'}", "--trainer.max_steps", str(steps),
            "--trainer.val_check_interval", "3", "--trainer.enable_progress_bar", "false", "--run_dir", str(run)]


def write_images(folder: Path, count: int, size: int = 16, classes: tuple[str, ...] | None = None,
                 seed: int = 0) -> list[Path]:
    """PNG files of random grey images: ``folder/class/i.png`` per class, or ``folder/i.png`` (flat, unlabelled)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for name in classes or [None]:
        where = folder / name if name else folder
        where.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            paths.append(where / f"{i}.png")
            Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(paths[-1])
    return paths


def quick_fit(run: Path, source: str, target: str, *extra: str, steps: int = 3) -> dict:
    """A few AdaMatch steps in this process (``fit.main``), ending with a validation and a checkpoint."""
    from adamatch_uan.fit import main

    return main(["--data.source", source, "--data.target", target, "--data.batch_size", "8", "--data.uratio", "1",
                 "--data.eval_batch_size", "64", "--data.download", "false", "--trainer.max_steps", str(steps),
                 "--trainer.val_check_interval", str(steps), "--trainer.enable_progress_bar", "false",
                 "--trainer.enable_model_summary", "false", "--model.init_args.ema_decay", "0.5",
                 "--run_dir", str(run), *extra])
