"""Folders of image files (ImageFolder trees, flat folders, globs, Tiny ImageNet), decoded once and cached.

Decoding 60,000 JPEGs takes about a minute; every later load reads one cached file. The
cache lives in ``$ADAMATCH_UAN_CACHE/decoded`` (default ``~/.cache/adamatch_uan/decoded``),
one file per (file list, image size): the key hashes every file's path, size and
modification time, so adding, removing or rewriting an image invalidates it. Before
decoding, the images' headers give their sizes, so a set that would not fit in memory
(``preprocess.check_memory``) or whose sizes differ without an image size to resize them to
is refused at once.
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from adamatch_uan.data.errors import DomainError
from adamatch_uan.data.preprocess import check_memory, resizer

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def cache_dir() -> Path:
    return Path(os.environ.get("ADAMATCH_UAN_CACHE", Path.home() / ".cache" / "adamatch_uan")) / "decoded"


def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def files_key(paths: Sequence[Path], resize_name: str) -> str:
    """sha256 over each file's resolved path, byte size and mtime (ns), and the resize's name."""
    digest = hashlib.sha256(resize_name.encode())
    for path in paths:
        stat = path.stat()
        digest.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def image_sizes(paths: Sequence[Path]) -> list[tuple[int, int]]:
    """(height, width) of each image from its header, without decoding it."""
    sizes = []
    for path in paths:
        try:
            with Image.open(path) as image:
                sizes.append((image.height, image.width))
        except OSError as error:
            raise DomainError(f"Could not read image {path}: {error}; remove or replace the file") from error
    return sizes


def decode(paths: Sequence[Path], size: int | None, what: str, cache: Path | None = None) -> Tensor:
    """Decode image files to uint8 (N, 3, S, S) (``preprocess.resizer(size)``; their own size for
    None), through the cache.

    Raises:
        DomainError: no files, an unreadable image, images of several sizes with ``size`` None, or
            more images than fit in memory (each naming the fix).
    """
    if not paths:
        raise DomainError(f"Expected image files ({', '.join(IMAGE_EXTENSIONS)}) in {what}, found none")
    resize, resize_name = resizer(size)
    paths = [Path(p) for p in paths]
    folder = cache if cache is not None else cache_dir()
    cached = folder / f"images-{files_key(paths, resize_name)}.pt"
    if cached.exists():
        return torch.load(cached, weights_only=True)["images"]
    if size is None:
        sizes = image_sizes(paths)
        distinct = sorted(set(sizes))
        if len(distinct) > 1:
            shown = ", ".join(f"{h}×{w}" for h, w in distinct[:4])
            raise DomainError(f"Expected the images of {what} to have one size, got {len(distinct)} ({shown}"
                              f"{' ...' if len(distinct) > 4 else ''}); set an image size (--data.image_size N) to "
                              f"resize them")
        height, width = distinct[0]
    else:
        height = width = size
    check_memory(len(paths), height, width, what)
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                pixels = np.array(image.convert("RGB"))
        except OSError as error:
            raise DomainError(f"Could not read image {path}: {error}; remove or replace the file") from error
        images.append(resize(torch.from_numpy(pixels).permute(2, 0, 1)[None])[0])
    shapes = {tuple(i.shape) for i in images}
    if len(shapes) > 1:  # non-square images at their own size
        raise DomainError(f"Expected the images of {what} to have one size, got {sorted(shapes)[:4]}; set an image "
                          f"size (--data.image_size N) to resize them")
    result = torch.stack(images)
    folder.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(".partial")
    torch.save({"images": result}, partial)
    os.replace(partial, cached)  # a cache file is complete or absent
    return result


def class_folders(path: Path) -> list[str] | None:
    """The class names of an ImageFolder at ``path`` (its sub-folders that hold images, sorted), or None
    when ``path`` holds image files itself (a flat folder of unlabelled images)."""
    if any(is_image(p) for p in path.iterdir()):
        return None
    return sorted(d.name for d in path.iterdir() if d.is_dir() and any(is_image(p) for p in d.rglob("*")))


def labelled_folder(path: Path, size: int | None) -> tuple[Tensor, Tensor, list[str], list[str]]:
    """An ImageFolder (PATH/class/…/image): images, labels (the sorted class names' indices), the class
    names and each image's path."""
    classes = class_folders(path)
    if not classes:
        raise DomainError(f"Expected an image folder at {path}: a sub-folder of images per class, or image files "
                          f"(unlabelled); found neither")
    samples = [(p, i) for i, name in enumerate(classes) for p in sorted((path / name).rglob("*")) if is_image(p)]
    images = decode([p for p, _ in samples], size, str(path))
    return images, torch.tensor([label for _, label in samples]), classes, [str(p) for p, _ in samples]


def image_files(pattern: str) -> list[Path]:
    """The image files a folder holds (at any depth), an image file, or those a glob pattern names, sorted."""
    path = Path(pattern).expanduser()
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if is_image(p))
    if path.is_file():
        return [path]
    return sorted(p for p in map(Path, glob.glob(str(path), recursive=True)) if is_image(p))


def tiny_imagenet(root: Path, train: bool, size: int | None) -> tuple[Tensor, Tensor, list[str], list[str]]:
    """Tiny ImageNet in the cs231n layout under ``root/tiny-imagenet-200``: ``train/<wnid>/images/*``
    (train) or ``val/images/*`` labelled by ``val/val_annotations.txt`` (the labelled held-out split);
    classes in sorted ``wnids.txt`` order. Returns images, labels, class names and paths."""
    base = root / "tiny-imagenet-200"
    wnids_file = base / "wnids.txt"
    if not wnids_file.exists():
        raise DomainError(f"Missing {wnids_file}; expected Tiny ImageNet's cs231n layout under {base} "
                          f"(wnids.txt, train/, val/); point --data.root at the folder that holds tiny-imagenet-200")
    names = sorted(wnids_file.read_text().split())
    classes = {wnid: i for i, wnid in enumerate(names)}
    if train:
        samples = [(p, classes[wnid]) for wnid in names
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
    images = decode([p for p, _ in samples], size, str(base))
    return images, torch.tensor([label for _, label in samples]), names, [str(p) for p, _ in samples]
