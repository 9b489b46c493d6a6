"""Image folders (ImageFolder trees, Tiny ImageNet) decode once; the cache is reused and invalidated when files change."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from adamatch_uan.data import DomainError, load_domain
from adamatch_uan.data import image_folders


def parts(domain):
    """A Domain's (images, labels)."""
    return domain.images, domain.labels


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):  # here in tmp_path, to count its files
    monkeypatch.setattr(image_folders, "cache_dir", lambda: tmp_path / "cache")


def write_image(path, size=(8, 8), value=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((*size, 3), value, dtype=np.uint8) if value is not None else \
        np.random.randint(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def make_folder(root, classes=("cat", "dog"), per_class=3, size=(8, 8)):
    for split in ("train", "test"):
        for c in classes:
            for i in range(per_class):
                write_image(root / split / c / f"{i}.png", size)


def test_image_folder_decodes_once_and_reads_the_cache_after(tmp_path, monkeypatch):
    make_folder(tmp_path / "data")
    images, labels = parts(load_domain(f"folder:{tmp_path / 'data'}", tmp_path, True, size=None))
    assert images.shape == (6, 3, 8, 8) and images.dtype == torch.uint8 and labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
    monkeypatch.setattr(image_folders.Image, "open", lambda *a, **k: pytest.fail("decoded again"))
    again, labels_again = parts(load_domain(f"folder:{tmp_path / 'data'}", tmp_path, True, size=None))
    assert torch.equal(again, images) and torch.equal(labels_again, labels)


def test_the_cache_is_invalidated_when_a_file_changes_or_is_added(tmp_path):
    make_folder(tmp_path / "data")
    spec = f"folder:{tmp_path / 'data'}"
    first, _ = parts(load_domain(spec, tmp_path, True, size=None))
    path = tmp_path / "data" / "train" / "cat" / "0.png"
    write_image(path, value=7)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # a newer file
    changed, _ = parts(load_domain(spec, tmp_path, True, size=None))
    assert (changed[0] == 7).all() and not torch.equal(changed, first)
    write_image(tmp_path / "data" / "train" / "dog" / "9.png")
    assert len(load_domain(spec, tmp_path, True, size=None)) == 7
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 3
    resized = load_domain(spec, tmp_path, True, size=16).images  # another size, another cache file
    assert resized.shape == (7, 3, 16, 16)


def test_images_of_different_sizes_need_an_image_size(tmp_path):
    make_folder(tmp_path / "data", per_class=1)
    write_image(tmp_path / "data" / "train" / "cat" / "big.png", size=(10, 12))
    with pytest.raises(DomainError, match="one size.*8×8, 10×12.*--data.image_size"):
        load_domain(f"folder:{tmp_path / 'data'}", tmp_path, True, size=None)
    assert load_domain(f"folder:{tmp_path / 'data'}", tmp_path, True, size=32).images.shape == (3, 3, 32, 32)


def make_tiny_imagenet(root, wnids=("n02", "n01", "n03"), per_class=2, val=4):
    base = root / "tiny-imagenet-200"
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for wnid in wnids:
        for i in range(per_class):
            write_image(base / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", (64, 64))
    rows = []
    for i in range(val):
        write_image(base / "val" / "images" / f"val_{i}.JPEG", (64, 64))
        rows.append(f"val_{i}.JPEG\t{wnids[i % len(wnids)]}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(rows) + "\n")


def test_tiny_imagenet_layout_and_validation_labels(tmp_path):
    make_tiny_imagenet(tmp_path)
    images, labels = parts(load_domain("tinyimagenet", tmp_path, True, size=None))
    assert images.shape == (6, 3, 64, 64) and labels.tolist() == [0, 0, 1, 1, 2, 2]  # sorted wnids: n01, n02, n03
    val_images, val_labels = parts(load_domain("tinyimagenet", tmp_path, False, size=None))
    assert val_images.shape == (4, 3, 64, 64) and val_labels.tolist() == [1, 0, 2, 1]  # n02, n01, n03, n02


def test_a_bad_tiny_imagenet_layout_names_what_is_missing(tmp_path):
    with pytest.raises(DomainError, match="wnids.txt.*--data.root"):
        load_domain("tinyimagenet", tmp_path, True)
    make_tiny_imagenet(tmp_path)
    (tmp_path / "tiny-imagenet-200" / "val" / "val_annotations.txt").unlink()
    with pytest.raises(DomainError, match="val_annotations.txt"):
        load_domain("tinyimagenet", tmp_path, False)
