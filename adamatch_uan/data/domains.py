"""Domains as in-memory uint8 tensors: built-in datasets through torchvision, and user data.

``load_domain(spec, root, train, download)`` returns ``(images, labels)``: images uint8
(N, 3, 32, 32) (or their own size with ``size=None``), labels int64 (N,). Specs:

- ``mnist``, ``svhn``, ``usps``: torchvision's dataset classes and on-disk formats under
  ``root`` (MNIST in ``root/MNIST/raw``, SVHN ``root/{train,test}_32x32.mat``, USPS
  ``root/usps.bz2`` / ``root/usps.t.bz2``); files are checked against torchvision's
  checksums (SVHN, USPS) before use.
- ``cifar10``, ``cifar100``, ``fashion_mnist``: torchvision's classes and formats
  (``root/cifar-10-batches-py``, ``root/cifar-100-python``, ``root/FashionMNIST/raw``).
- ``tinyimagenet``: the cs231n layout under ``root/tiny-imagenet-200`` (64×64; the labelled
  validation split is the test split), decoded once and cached (``image_folders.py``).
- ``npz:PATH``: either ``x`` (N, H, W[, C]) uint8 and ``y`` (N,) with the split fraction
  ``test_fraction`` (the last part is the test split), or ``x_train, y_train, x_test, y_test``.
- ``folder:PATH``: an ImageFolder (PATH/class/image); PATH/train and PATH/test when both
  exist, else split by ``test_fraction``; decoded once and cached (``image_folders.py``).

Preprocessing (docs/METHOD.md §5), ``size=32``: 28×28 images are zero-padded by 2 px, 16×16
ones are resized to 28×28 then padded, other sizes resized to 32×32; grey is repeated to 3
channels. ``size=None`` keeps each dataset's own size (grey still becomes 3 channels);
another int resizes to it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.datasets as tvd
from torch import Tensor

from adamatch_uan.data.errors import DomainError
from adamatch_uan.data.image_folders import Resize, image_folder, tiny_imagenet

# Expected md5 of the files each built-in domain reads, from torchvision's own tables.
CHECKSUMS: dict[str, dict[str, str]] = {
    "usps": {name: md5 for _, name, md5 in tvd.USPS.split_list.values()},
    "svhn": {name: md5 for _, name, md5 in tvd.SVHN.split_list.values()},
}
BUILTIN_FILES = {
    "mnist": {True: ["MNIST/raw/train-images-idx3-ubyte", "MNIST/raw/train-labels-idx1-ubyte"],
              False: ["MNIST/raw/t10k-images-idx3-ubyte", "MNIST/raw/t10k-labels-idx1-ubyte"]},
    "svhn": {True: ["train_32x32.mat"], False: ["test_32x32.mat"]},
    "usps": {True: ["usps.bz2"], False: ["usps.t.bz2"]},
    "cifar10": {True: ["cifar-10-batches-py/data_batch_1"], False: ["cifar-10-batches-py/test_batch"]},
    "cifar100": {True: ["cifar-100-python/train"], False: ["cifar-100-python/test"]},
    "fashion_mnist": {True: ["FashionMNIST/raw/train-images-idx3-ubyte", "FashionMNIST/raw/train-labels-idx1-ubyte"],
                      False: ["FashionMNIST/raw/t10k-images-idx3-ubyte", "FashionMNIST/raw/t10k-labels-idx1-ubyte"]},
}
FOLDER_DOMAINS = ("tinyimagenet",)


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False).round().clamp(0, 255).byte()


def to_rgb(images: Tensor) -> Tensor:
    """uint8 (N, H, W) or (N, C, H, W), C in {1, 3} → uint8 (N, 3, H, W), grey repeated."""
    x = images.unsqueeze(1) if images.dim() == 3 else images
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[1] != 3:
        raise DomainError(f"Expected 1 or 3 channels, got {x.shape[1]}")
    return x.contiguous()


def to_rgb32(images: Tensor) -> Tensor:
    """uint8 (N, H, W) or (N, C, H, W), C in {1, 3} → uint8 (N, 3, 32, 32) as §5 prescribes."""
    x = images.unsqueeze(1) if images.dim() == 3 else images
    size = tuple(x.shape[-2:])
    if size == (16, 16):
        x, size = _resize(x, (28, 28)), (28, 28)
    if size == (28, 28):
        x = F.pad(x, (2, 2, 2, 2))
    elif size != (32, 32):
        x = _resize(x, (32, 32))
    return to_rgb(x)


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _require_builtin(name: str, root: Path, train: bool, download: bool) -> None:
    """Raise a DomainError naming missing or corrupted files (after a download attempt if allowed)."""
    files = [root / f for f in BUILTIN_FILES[name][train]]
    missing = [f for f in files if not f.exists()]
    if missing and not download:
        raise DomainError(f"Missing {name} files: {', '.join(map(str, missing))}. Put them under {root} "
                          f"(torchvision's layout) or point --data.root at a folder that has them, "
                          f"or set --data.download true")
    for f in files:
        expected = CHECKSUMS.get(name, {}).get(f.name)
        if f.exists() and expected and _md5(f) != expected:
            raise DomainError(f"Wrong checksum for {f}: md5 {_md5(f)}, expected {expected}; "
                              f"the file is corrupted or a different version: replace it")


def _builtin(name: str, root: Path, train: bool, download: bool) -> tuple[Tensor, Tensor]:
    _require_builtin(name, root, train, download)
    try:
        if name == "mnist":
            ds = tvd.MNIST(root, train=train, download=download)
            return ds.data, ds.targets
        if name == "fashion_mnist":
            ds = tvd.FashionMNIST(root, train=train, download=download)
            return ds.data, ds.targets
        if name == "svhn":
            ds = tvd.SVHN(root, split="train" if train else "test", download=download)
            return torch.from_numpy(ds.data), torch.from_numpy(ds.labels)
        if name in ("cifar10", "cifar100"):
            ds = (tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100)(root, train=train, download=download)
            return torch.from_numpy(ds.data).permute(0, 3, 1, 2), torch.tensor(ds.targets)
        ds = tvd.USPS(root, train=train, download=download)
        return torch.from_numpy(ds.data), torch.tensor(ds.targets)
    except (OSError, RuntimeError) as err:  # torchvision's download or integrity failures
        files = ", ".join(str(root / f) for f in BUILTIN_FILES[name][train])
        raise DomainError(f"Could not load {name} from {root} ({err}). Expected files: {files}; "
                          f"point --data.root at a folder that has them") from err


def _split(x: Tensor, y: Tensor, train: bool, test_fraction: float) -> tuple[Tensor, Tensor]:
    cut = len(x) - int(round(len(x) * test_fraction))
    return (x[:cut], y[:cut]) if train else (x[cut:], y[cut:])


def _npz(path: Path, train: bool, test_fraction: float, num_classes: int) -> tuple[Tensor, Tensor]:
    if not path.exists():
        raise DomainError(f"Missing npz file {path}; check the path in npz:PATH")
    try:
        data = np.load(path)
    except (OSError, ValueError) as err:
        raise DomainError(f"Could not read {path} as an npz file: {err}") from err
    keys = set(data.files)
    if {"x_train", "y_train", "x_test", "y_test"} <= keys:
        x, y = (data["x_train"], data["y_train"]) if train else (data["x_test"], data["y_test"])
    elif {"x", "y"} <= keys:
        x, y = data["x"], data["y"]
    else:
        raise DomainError(f"Expected {path} to hold x, y or x_train, y_train, x_test, y_test; got {sorted(keys)}")
    if x.dtype != np.uint8 or x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 3)):
        raise DomainError(f"Expected x in {path} as uint8 (N, H, W[, C]) with C in 1 or 3, got {x.dtype} {x.shape}")
    if y.ndim != 1 or len(y) != len(x):
        raise DomainError(f"Expected labels (N,) = ({len(x)},) in {path}, got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer) or (len(y) and (y.min() < 0 or y.max() >= num_classes)):
        raise DomainError(f"Expected integer labels in [0, {num_classes}) in {path}, got {y.dtype} "
                          f"in [{y.min() if len(y) else '-'}, {y.max() if len(y) else '-'}]")
    images = torch.from_numpy(x)
    images = images.permute(0, 3, 1, 2) if images.dim() == 4 else images
    labels = torch.from_numpy(y.astype(np.int64))
    return (images, labels) if {"x_train"} <= keys else _split(images, labels, train, test_fraction)


def resizer(size: int | None) -> tuple[Resize, str]:
    """The per-image preprocessing of ``size`` (module docstring) and its name (cache keys)."""
    if size == 32:
        return to_rgb32, "rgb32"
    if size is None:
        return to_rgb, "native"
    return lambda x: to_rgb(_resize(x, (size, size))), f"resize{size}"


def load_domain(spec: str, root: str | Path, train: bool, download: bool = True, test_fraction: float = 0.2,
                num_classes: int = 10, size: int | None = 32) -> tuple[Tensor, Tensor]:
    """Load one split of a domain as (uint8 (N, 3, H, W), int64 (N,)); see the module docstring.

    Raises:
        DomainError: unknown spec, missing or corrupted files, malformed npz or image folder.
    """
    root = Path(root).expanduser()
    kind, _, path = spec.partition(":")
    resize, name = resizer(size)
    if spec in BUILTIN_FILES:
        images, labels = _builtin(spec, root, train, download)
    elif spec == "tinyimagenet":
        return tiny_imagenet(root, train, resize, name)
    elif kind == "npz" and path:
        images, labels = _npz(Path(path).expanduser(), train, test_fraction, num_classes)
    elif kind == "folder" and path:
        images, labels, has_splits = image_folder(Path(path).expanduser(), train, resize, name)
        if not has_splits:
            order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
            images, labels = _split(images[order], labels[order], train, test_fraction)
        return images, labels
    else:
        raise DomainError(f"Unknown domain {spec!r}; expected one of {', '.join([*BUILTIN_FILES, *FOLDER_DOMAINS])}, "
                          f"npz:PATH or folder:PATH; use --data.source / --data.target")
    return resize(images.unsqueeze(1) if images.dim() == 3 else images), labels.long()
