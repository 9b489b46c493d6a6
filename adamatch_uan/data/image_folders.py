"""Folders of image files (ImageFolder trees, Tiny ImageNet), decoded once and cached as uint8 tensors.

Decoding 60,000 JPEGs takes about a minute; every later load reads one cached file. The
cache lives in ``$ADAMATCH_UAN_CACHE/decoded`` (default ``~/.cache/adamatch_uan/decoded``),
one file per (file list, image size): the key hashes every file's path, size and
modification time, so adding, removing or rewriting an image invalidates it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torchvision.datasets as tvd
from PIL import Image
from torch import Tensor

from adamatch_uan.data.errors import DomainError

Resize = Callable[[Tensor], Tensor]
"""uint8 (1, 3, H, W) → uint8 (1, 3, H', W'), applied to each image before stacking."""


def cache_dir() -> Path:
    return Path(os.environ.get("ADAMATCH_UAN_CACHE", Path.home() / ".cache" / "adamatch_uan")) / "decoded"


def files_key(paths: Sequence[Path], resize_name: str) -> str:
    """sha256 over each file's resolved path, byte size and mtime (ns), and the resize's name."""
    digest = hashlib.sha256(resize_name.encode())
    for path in paths:
        stat = path.stat()
        digest.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def decode(samples: Sequence[tuple[Path, int]], resize: Resize, resize_name: str,
           cache: Path | None = None) -> tuple[Tensor, Tensor]:
    """Decode image files to uint8 (N, 3, H, W) with ``resize`` applied, and int64 labels (N,), through the cache.

    Raises:
        DomainError: an unreadable image, or images of different sizes after ``resize``.
    """
    if not samples:
        raise DomainError("Expected at least one image file, found none")
    paths = [Path(p) for p, _ in samples]
    folder = cache if cache is not None else cache_dir()
    cached = folder / f"images-{files_key(paths, resize_name)}.pt"
    if cached.exists():
        saved = torch.load(cached, weights_only=True)
        return saved["images"], saved["labels"]
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                pixels = np.array(image.convert("RGB"))
        except OSError as error:
            raise DomainError(f"Could not read image {path}: {error}") from error
        images.append(resize(torch.from_numpy(pixels).permute(2, 0, 1)[None])[0])
    shapes = {tuple(i.shape) for i in images}
    if len(shapes) > 1:
        raise DomainError(f"Expected images of one size, got {sorted(shapes)[:4]}; set an image size "
                          f"(--data.resize) to resize them")
    result = {"images": torch.stack(images), "labels": torch.tensor([label for _, label in samples])}
    folder.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(".partial")
    torch.save(result, partial)
    os.replace(partial, cached)  # a cache file is complete or absent
    return result["images"], result["labels"]


def image_folder(path: Path, train: bool, resize: Resize, resize_name: str) -> tuple[Tensor, Tensor, bool]:
    """An ImageFolder (PATH/class/image): PATH/train or PATH/test when both exist, else all of PATH.

    Returns:
        images, labels, and whether the split came from the folders (else the caller splits).
    """
    if not path.is_dir():
        raise DomainError(f"Missing image folder {path}; check the path in folder:PATH")
    has_splits = (path / "train").is_dir() and (path / "test").is_dir()
    try:
        ds = tvd.ImageFolder(path / ("train" if train else "test") if has_splits else path)
    except (FileNotFoundError, RuntimeError) as error:
        raise DomainError(f"Expected an ImageFolder at {path} (one folder of images per class): {error}") from error
    images, labels = decode([(Path(p), t) for p, t in ds.samples], resize, resize_name)
    return images, labels, has_splits


def tiny_imagenet(root: Path, train: bool, resize: Resize, resize_name: str) -> tuple[Tensor, Tensor]:
    """Tiny ImageNet in the cs231n layout under ``root/tiny-imagenet-200``: ``train/<wnid>/images/*``
    (train) or ``val/images/*`` labelled by ``val/val_annotations.txt`` (the labelled held-out split);
    classes in sorted ``wnids.txt`` order."""
    base = root / "tiny-imagenet-200"
    wnids_file = base / "wnids.txt"
    if not wnids_file.exists():
        raise DomainError(f"Missing {wnids_file}; expected Tiny ImageNet's cs231n layout under {base} "
                          f"(wnids.txt, train/, val/); point --data.root at the folder that holds tiny-imagenet-200")
    classes = {wnid: i for i, wnid in enumerate(sorted(wnids_file.read_text().split()))}
    if train:
        samples = [(p, classes[wnid]) for wnid in sorted(classes)
                   for p in sorted((base / "train" / wnid / "images").glob("*")) if p.is_file()]
    else:
        annotations = base / "val" / "val_annotations.txt"
        if not annotations.exists():
            raise DomainError(f"Missing {annotations}: the labels of Tiny ImageNet's validation split")
        rows = [line.split("\t") for line in annotations.read_text().splitlines() if line.strip()]
        unknown = sorted({r[1] for r in rows if r[1] not in classes})
        if unknown:
            raise DomainError(f"{annotations} names classes not in wnids.txt: {unknown[:5]}")
        samples = [(base / "val" / "images" / r[0], classes[r[1]]) for r in rows]
    missing = [str(p) for p, _ in samples if not p.exists()]
    if missing:
        raise DomainError(f"Missing {len(missing)} Tiny ImageNet images, e.g. {missing[0]}")
    return decode(samples, resize, resize_name)
