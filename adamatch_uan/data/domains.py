"""Domains as in-memory uint8 tensors: built-in datasets through torchvision, and user data, labelled or not.

``load_domain(spec, root, train, ...)`` returns a :class:`Domain` (images uint8 (N, 3, S, S)
preprocessed by ``preprocess.resizer(size)``, labels or None, class names, where each image
came from), or None for a split the domain does not have (an unlabelled domain has no test
split: all its images are training images). Specs:

- ``mnist``, ``svhn``, ``usps``: torchvision's dataset classes and on-disk formats under
  ``root`` (MNIST in ``root/MNIST/raw``, SVHN ``root/{train,test}_32x32.mat``, USPS
  ``root/usps.bz2`` / ``root/usps.t.bz2``); files are checked against torchvision's
  checksums (SVHN, USPS) before use. Their labels are the digits (numbered classes).
- ``cifar10``, ``cifar100``, ``fashion_mnist``: torchvision's classes and formats
  (``root/cifar-10-batches-py``, ``root/cifar-100-python``, ``root/FashionMNIST/raw``), with
  their class names.
- ``tinyimagenet``: the cs231n layout under ``root/tiny-imagenet-200`` (64×64; the labelled
  validation split is the test split), decoded once and cached (``image_folders.py``).
- ``npz:PATH``: ``x`` (N, H, W[, C]) uint8, with ``y`` (N,) split into train and test by
  ``test_fraction`` (stratified, seeded by ``split_seed``) or without ``y`` (unlabelled, all
  training images); or ``x_train`` [, ``y_train``, ``x_test``, ``y_test``]. An optional
  ``classes`` array names the labels (else they are class indices).
- ``folder:PATH``: an ImageFolder (PATH/class/…/image), with PATH/train and PATH/test when both
  exist, else split like an npz; or, when PATH holds image files itself, a flat folder of
  unlabelled images (any depth). Decoded once and cached (``image_folders.py``).
- ``images:PATH``: unlabelled images: every image file under the folder PATH (any depth), one
  image file, or a glob pattern (``'photos/**/*.jpg'``).

A relative PATH that does not exist from the working directory is looked up under ``root``
(``--data.root``), so a config's ``npz:USPS/usps_esl_16x16.npz`` follows the data root. Labels are
in the domain's own index here; ``classes.onto`` maps them onto a run's classes.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import torch
import torchvision.datasets as tvd
from torch import Tensor

from adamatch_uan.data.errors import DomainError
from adamatch_uan.data.image_folders import class_folders, decode, image_files, labelled_folder, tiny_imagenet
from adamatch_uan.data.preprocess import check_memory, resizer
from adamatch_uan.data.splits import stratified_split


@dataclasses.dataclass(frozen=True)
class Domain:
    """One split of a domain.

    Attributes:
        spec: the spec it was loaded from.
        images: uint8 (N, 3, H, W).
        labels: int64 (N,), or None for unlabelled images.
        classes: the name of each label id, or None when the ids are class indices (the digit
            sets, npz files without names).
        ids: where each image came from: a file path, or ``"<source>[i]"``.
    """

    spec: str
    images: Tensor
    labels: Tensor | None
    classes: list[str] | None
    ids: list[str]

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: Tensor) -> Domain:
        """The images at ``index`` (int64), in that order."""
        return dataclasses.replace(self, images=self.images[index],
                                   labels=None if self.labels is None else self.labels[index],
                                   ids=[self.ids[i] for i in index.tolist()])

    def relabelled(self, labels: Tensor, classes: list[str] | None) -> Domain:
        return dataclasses.replace(self, labels=labels, classes=classes)


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


def _builtin(name: str, root: Path, train: bool, download: bool) -> tuple[Tensor, Tensor, list[str] | None]:
    """Images, labels and class names (None for the digit sets) of a built-in domain."""
    _require_builtin(name, root, train, download)
    try:
        if name == "mnist":
            ds = tvd.MNIST(root, train=train, download=download)
            return ds.data, ds.targets, None
        if name == "fashion_mnist":
            ds = tvd.FashionMNIST(root, train=train, download=download)
            return ds.data, ds.targets, list(ds.classes)
        if name == "svhn":
            ds = tvd.SVHN(root, split="train" if train else "test", download=download)
            return torch.from_numpy(ds.data), torch.from_numpy(ds.labels), None
        if name in ("cifar10", "cifar100"):
            ds = (tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100)(root, train=train, download=download)
            return torch.from_numpy(ds.data).permute(0, 3, 1, 2), torch.tensor(ds.targets), list(ds.classes)
        ds = tvd.USPS(root, train=train, download=download)
        return torch.from_numpy(ds.data), torch.tensor(ds.targets), None
    except (OSError, RuntimeError) as err:  # torchvision's download or integrity failures
        files = ", ".join(str(root / f) for f in BUILTIN_FILES[name][train])
        raise DomainError(f"Could not load {name} from {root} ({err}). Expected files: {files}; "
                          f"point --data.root at a folder that has them") from err


def _npz_arrays(path: Path, train: bool) -> tuple[np.ndarray | None, np.ndarray | None, list[str] | None, bool, str]:
    """x, y (or None), the class names (or None), whether the file has its own split, and x's key."""
    if not path.exists():
        raise DomainError(f"Missing npz file {path}; check the path in npz:PATH")
    try:
        with np.load(path) as data:
            arrays = {key: data[key] for key in data.files}
    except Exception as err:  # a truncated or foreign file: zipfile, pickle and numpy raise many types
        raise DomainError(f"Could not read {path} as an npz file ({type(err).__name__}: {err}); "
                          f"the file is truncated or not an npz: write it again with numpy.savez") from err
    classes = [str(c) for c in arrays["classes"].tolist()] if "classes" in arrays else None
    if "x_train" in arrays:
        key = "x_train" if train else "x_test"
        labels = "y_train" if train else "y_test"
        return arrays.get(key), arrays.get(labels), classes, True, key
    if "x" in arrays:
        return arrays["x"], arrays.get("y"), classes, False, "x"
    raise DomainError(f"Expected {path} to hold x (and y) or x_train (and y_train, x_test, y_test); "
                      f"got {sorted(arrays)}")


def _npz(path: Path, train: bool, test_fraction: float, split_seed: int, size: int | None) -> Domain | None:
    x, y, classes, own_split, key = _npz_arrays(path, train)
    if x is None:
        return None
    if x.dtype != np.uint8 or x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 3)):
        raise DomainError(f"Expected {key} in {path} as uint8 (N, H, W[, C]) with C in 1 or 3, got {x.dtype} {x.shape}")
    labels = None
    if y is not None:
        if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
            raise DomainError(f"Expected integer labels (N,) = ({len(x)},) beside {key} in {path}, got {y.dtype} {y.shape}")
        if len(y) and (y.min() < 0 or (classes is not None and y.max() >= len(classes))):
            raise DomainError(f"Expected labels in [0, {len(classes) if classes else 'K'}) in {path}, got "
                              f"[{y.min()}, {y.max()}]")
        labels = torch.from_numpy(y.astype(np.int64))
    spec = f"npz:{path}"
    images = torch.from_numpy(x)
    images = images.permute(0, 3, 1, 2) if images.dim() == 4 else images.unsqueeze(1)
    domain = Domain(spec, images, labels, classes, [f"{path.name}:{key}[{i}]" for i in range(len(x))])
    if not own_split:
        if labels is None:  # unlabelled: every image is a training image
            if not train:
                return None
        else:
            kept, held = stratified_split(labels, len(x), test_fraction, split_seed)
            domain = domain.subset(kept if train else held)
    return _preprocessed(domain, size)


def _preprocessed(domain: Domain, size: int | None) -> Domain:
    """The domain's images after ``resizer(size)``, if they fit in memory."""
    h, w = domain.images.shape[-2:]
    check_memory(len(domain), size or h, size or w, domain.spec)
    return dataclasses.replace(domain, images=resizer(size)[0](domain.images))


def _folder(path: Path, train: bool, test_fraction: float, split_seed: int, size: int | None) -> Domain | None:
    if not path.is_dir():
        raise DomainError(f"Missing image folder {path}; check the path in folder:PATH")
    spec = f"folder:{path}"
    if (path / "train").is_dir() and (path / "test").is_dir():
        images, labels, classes, ids = labelled_folder(path / ("train" if train else "test"), size)
        return Domain(spec, images, labels, classes, ids)
    if class_folders(path) is None:  # image files here: unlabelled
        return _images(str(path), train, size, spec)
    images, labels, classes, ids = labelled_folder(path, size)
    kept, held = stratified_split(labels, len(labels), test_fraction, split_seed)
    return Domain(spec, images, labels, classes, ids).subset(kept if train else held)


def _images(pattern: str, train: bool, size: int | None, spec: str | None = None) -> Domain | None:
    if not train:
        return None
    paths = image_files(pattern)
    return Domain(spec or f"images:{pattern}", decode(paths, size, pattern), None, None, [str(p) for p in paths])


def _located(path: str, root: Path) -> str:
    """``path``, or ``root/path`` when ``path`` is relative, finds nothing from here and something there."""
    here = Path(path).expanduser()
    if here.is_absolute() or here.exists() or image_files(path):
        return str(here)
    there = root / here
    return str(there) if there.exists() or image_files(str(there)) else str(here)


def load_domain(spec: str, root: str | Path, train: bool, download: bool = True, test_fraction: float = 0.2,
                size: int | None = 32, split_seed: int = 0) -> Domain | None:
    """Load one split of a domain (module docstring), or None when the domain has no such split.

    Raises:
        DomainError: unknown spec, missing or corrupted files, malformed npz or image folder, too many
            images for the memory.
    """
    root = Path(root).expanduser()
    kind, _, path = spec.partition(":")
    if kind in ("npz", "folder", "images") and path:
        path = _located(path, root)
    if spec in BUILTIN_FILES:
        images, labels, classes = _builtin(spec, root, train, download)
        images = images.unsqueeze(1) if images.dim() == 3 else images
        split = "train" if train else "test"
        domain = Domain(spec, images, labels.long(), classes, [f"{spec}:{split}[{i}]" for i in range(len(images))])
        return _preprocessed(domain, size)
    if spec == "tinyimagenet":
        return Domain(spec, *tiny_imagenet(root, train, size))
    if kind == "npz" and path:
        return _npz(Path(path).expanduser(), train, test_fraction, split_seed, size)
    if kind == "folder" and path:
        return _folder(Path(path).expanduser(), train, test_fraction, split_seed, size)
    if kind == "images" and path:
        return _images(path, train, size, spec)
    raise DomainError(f"Unknown domain {spec!r}; expected one of {', '.join([*BUILTIN_FILES, *FOLDER_DOMAINS])}, "
                      f"npz:PATH, folder:PATH or images:PATH; use --data.source / --data.target")
