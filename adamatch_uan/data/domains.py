"""Domains as in-memory uint8 tensors: built-in digit sets through torchvision, and user data.

``load_domain(spec, root, train, download)`` returns ``(images, labels)``: images uint8
(N, 3, 32, 32), labels int64 (N,). Specs:

- ``mnist``, ``svhn``, ``usps``: torchvision's dataset classes and on-disk formats under
  ``root`` (MNIST in ``root/MNIST/raw``, SVHN ``root/{train,test}_32x32.mat``, USPS
  ``root/usps.bz2`` / ``root/usps.t.bz2``); files are checked against torchvision's
  checksums (SVHN, USPS) before use.
- ``npz:PATH``: either ``x`` (N, H, W[, C]) uint8 and ``y`` (N,) with the split fraction
  ``test_fraction`` (the last part is the test split), or ``x_train, y_train, x_test, y_test``.
- ``folder:PATH``: an ImageFolder (PATH/class/image); PATH/train and PATH/test when both
  exist, else split by ``test_fraction``.

Preprocessing (ALGORITHMS.md §5): 28×28 images are zero-padded by 2 px, 16×16 ones are
resized to 28×28 then padded, other sizes resized to 32×32; grey is repeated to 3 channels.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.datasets as tvd
from torch import Tensor

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
}


class DomainError(ValueError):
    """A domain's files are missing, corrupted or malformed; the message says which and how to fix it."""


def to_rgb32(images: Tensor) -> Tensor:
    """uint8 (N, H, W) or (N, C, H, W), C in {1, 3} → uint8 (N, 3, 32, 32) as §5 prescribes."""
    x = images.unsqueeze(1) if images.dim() == 3 else images
    size = tuple(x.shape[-2:])
    if size == (16, 16):
        x = F.interpolate(x.float(), size=(28, 28), mode="bilinear", align_corners=False).round().clamp(0, 255).byte()
        size = (28, 28)
    if size == (28, 28):
        x = F.pad(x, (2, 2, 2, 2))
    elif size != (32, 32):
        x = F.interpolate(x.float(), size=(32, 32), mode="bilinear", align_corners=False).round().clamp(0, 255).byte()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[1] != 3:
        raise DomainError(f"Expected 1 or 3 channels, got {x.shape[1]}")
    return x.contiguous()


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
        if name == "svhn":
            ds = tvd.SVHN(root, split="train" if train else "test", download=download)
            return torch.from_numpy(ds.data), torch.from_numpy(ds.labels)
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


def _folder(path: Path, train: bool, test_fraction: float) -> tuple[Tensor, Tensor]:
    split = path / ("train" if train else "test")
    has_splits = (path / "train").is_dir() and (path / "test").is_dir()
    if not path.is_dir():
        raise DomainError(f"Missing image folder {path}; check the path in folder:PATH")
    ds = tvd.ImageFolder(split if has_splits else path)
    images = torch.stack([to_rgb32(torch.from_numpy(np.array(ds.loader(p).convert("RGB"))).permute(2, 0, 1)[None])[0]
                          for p, _ in ds.samples])
    labels = torch.tensor([t for _, t in ds.samples])
    if has_splits:
        return images, labels
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    return _split(images[order], labels[order], train, test_fraction)


def load_domain(spec: str, root: str | Path, train: bool, download: bool = True, test_fraction: float = 0.2,
                num_classes: int = 10) -> tuple[Tensor, Tensor]:
    """Load one split of a domain as (uint8 (N, 3, 32, 32), int64 (N,)); see the module docstring.

    Raises:
        DomainError: unknown spec, missing or corrupted files, malformed npz.
    """
    root = Path(root).expanduser()
    kind, _, path = spec.partition(":")
    if spec in BUILTIN_FILES:
        images, labels = _builtin(spec, root, train, download)
    elif kind == "npz" and path:
        images, labels = _npz(Path(path).expanduser(), train, test_fraction, num_classes)
    elif kind == "folder" and path:
        images, labels = _folder(Path(path).expanduser(), train, test_fraction)
    else:
        raise DomainError(f"Unknown domain {spec!r}; expected one of {', '.join(BUILTIN_FILES)}, npz:PATH or "
                          f"folder:PATH; use --data.source / --data.target")
    return to_rgb32(images), labels.long()
