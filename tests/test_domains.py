"""Every domain loads from small generated files in its real on-disk format; bad input is a clear error."""

import bz2
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adamatch_uan.data import DomainError, load_domain, to_rgb32
from adamatch_uan.data import domains

from conftest import MNIST_FILES, SHARED, USPS_NPZ, needs_shared


def parts(domain):
    """A Domain's (images, labels)."""
    return domain.images, domain.labels



def write_idx(path: Path, array: np.ndarray) -> None:
    magic = {3: 2051, 1: 2049}[array.ndim]
    header = np.array([magic, *array.shape], dtype=">i4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def make_mnist(root: Path, n: int = 12) -> np.ndarray:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    labels = np.arange(n) % 10
    for prefix in ("train", "t10k"):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", np.random.randint(0, 256, (n, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return labels


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def make_usps(root: Path, monkeypatch, n: int = 6) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name in ("usps.bz2", "usps.t.bz2"):
        lines = [" ".join([str(i % 10 + 1)] + [f"{j + 1}:{v:.4f}" for j, v in enumerate(np.random.uniform(-1, 1, 256))])
                 for i in range(n)]
        (root / name).write_bytes(bz2.compress(("\n".join(lines) + "\n").encode()))
        monkeypatch.setitem(domains.CHECKSUMS["usps"], name, md5(root / name))


def make_svhn(root: Path, monkeypatch, n: int = 5) -> None:
    from scipy.io import savemat

    root.mkdir(parents=True, exist_ok=True)
    import torchvision.datasets as tvd

    for split in ("train", "test"):
        _, name, _ = tvd.SVHN.split_list[split]
        savemat(root / name, {"X": np.random.randint(0, 256, (32, 32, 3, n), dtype=np.uint8),
                              "y": np.array([[10], [1], [2], [3], [10]][:n])})
        monkeypatch.setitem(domains.CHECKSUMS["svhn"], name, md5(root / name))
        monkeypatch.setitem(tvd.SVHN.split_list, split, [tvd.SVHN.split_list[split][0], name, md5(root / name)])


def check(images, labels, n):
    assert images.shape == (n, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.shape == (n,) and labels.dtype == torch.int64
    assert 0 <= labels.min() and labels.max() <= 9


def test_mnist_idx_files(tmp_path):
    labels = make_mnist(tmp_path)
    for train in (True, False):
        images, y = parts(load_domain("mnist", tmp_path, train, download=False))
        check(images, y, 12)
        assert y.tolist() == labels.tolist()
        assert images[:, :, :2].eq(0).all() and images[:, :, -2:].eq(0).all()  # zero-padded 28 → 32
        assert torch.equal(images[:, 0], images[:, 2])  # grey repeated


def test_usps_bz2_files(tmp_path, monkeypatch):
    make_usps(tmp_path, monkeypatch)
    images, labels = parts(load_domain("usps", tmp_path, True, download=False))
    check(images, labels, 6)
    assert labels.tolist() == [i % 10 for i in range(6)]


def test_svhn_mat_files_map_label_10_to_0(tmp_path, monkeypatch):
    make_svhn(tmp_path, monkeypatch)
    images, labels = parts(load_domain("svhn", tmp_path, False, download=False))
    check(images, labels, 5)
    assert labels.tolist() == [0, 1, 2, 3, 0]


def test_npz_with_split_fraction_and_with_explicit_splits(tmp_path):
    x = np.random.randint(0, 256, (10, 16, 16), dtype=np.uint8)
    np.savez(tmp_path / "one.npz", x=x, y=np.arange(10) % 10)
    train, test = (load_domain(f"npz:{tmp_path / 'one.npz'}", tmp_path, t, test_fraction=0.2) for t in (True, False))
    check(*parts(train), 8)
    check(*parts(test), 2)
    np.savez(tmp_path / "two.npz", x_train=np.zeros((3, 32, 32, 3), np.uint8), y_train=np.array([1, 2, 3]),
             x_test=np.zeros((2, 28, 28), np.uint8), y_test=np.array([4, 5]))
    check(*parts(load_domain(f"npz:{tmp_path / 'two.npz'}", tmp_path, True)), 3)
    check(*parts(load_domain(f"npz:{tmp_path / 'two.npz'}", tmp_path, False)), 2)


def test_image_folder(tmp_path):
    for split in ("train", "test"):
        for label in ("a", "b"):
            (tmp_path / split / label).mkdir(parents=True)
            Image.fromarray(np.random.randint(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / split / label / "0.png")
    images, labels = parts(load_domain(f"folder:{tmp_path}", tmp_path, True))
    check(images, labels, 2)
    assert labels.tolist() == [0, 1]


def make_cifar(root: Path, monkeypatch, name: str, n: int = 6) -> np.ndarray:
    """CIFAR python batches as torchvision reads them (pickled dicts of data (N, 3072) and labels)."""
    import pickle

    import torchvision.datasets as tvd

    cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    key = "labels" if name == "cifar10" else "fine_labels"
    labels = np.arange(n) % (10 if name == "cifar10" else 100)
    for attr in ("train_list", "test_list"):
        entries = []
        for file, _ in getattr(cls, attr):
            batch = {"data": np.random.randint(0, 256, (n, 3072), dtype=np.uint8), key: labels.tolist()}
            (folder / file).write_bytes(pickle.dumps(batch))
            entries.append([file, md5(folder / file)])
        monkeypatch.setattr(cls, attr, entries)
    meta = {"cifar10": ("label_names", [str(i) for i in range(10)]), "cifar100": ("fine_label_names", [str(i) for i in range(100)])}[name]
    (folder / cls.meta["filename"]).write_bytes(pickle.dumps({meta[0]: meta[1]}))
    monkeypatch.setitem(cls.meta, "md5", md5(folder / cls.meta["filename"]))
    return labels


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_python_batches_keep_their_size(tmp_path, monkeypatch, name):
    labels = make_cifar(tmp_path, monkeypatch, name)
    for train, count in ((True, 6 * (5 if name == "cifar10" else 1)), (False, 6)):
        images, got = parts(load_domain(name, tmp_path, train, download=False, size=None))
        assert images.shape == (count, 3, 32, 32) and images.dtype == torch.uint8 and got.dtype == torch.int64
        assert got[:6].tolist() == labels.tolist()


def test_fashion_mnist_idx_files(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix in ("train", "t10k"):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", np.random.randint(0, 256, (7, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(7) % 10)
    images, labels = parts(load_domain("fashion_mnist", tmp_path, True, download=False, size=None))
    assert images.shape == (7, 3, 28, 28) and labels.tolist() == list(range(7))
    assert load_domain("fashion_mnist", tmp_path, False, download=False).images.shape == (7, 3, 32, 32)  # padded


def test_preprocessing_sizes():
    assert to_rgb32(torch.zeros(2, 16, 16, dtype=torch.uint8)).shape == (2, 3, 32, 32)
    assert to_rgb32(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape == (2, 3, 32, 32)
    with pytest.raises(DomainError, match="channels"):
        to_rgb32(torch.zeros(2, 2, 32, 32, dtype=torch.uint8))


def test_missing_files_name_the_files_and_the_option(tmp_path):
    with pytest.raises(DomainError) as err:
        load_domain("mnist", tmp_path, True, download=False)
    message = str(err.value)
    assert "train-images-idx3-ubyte" in message and str(tmp_path) in message and "--data.root" in message


def test_wrong_checksum_says_so(tmp_path, monkeypatch):
    make_usps(tmp_path, monkeypatch)
    monkeypatch.setitem(domains.CHECKSUMS["usps"], "usps.bz2", "0" * 32)
    with pytest.raises(DomainError, match="Wrong checksum"):
        load_domain("usps", tmp_path, True, download=False)


@pytest.mark.parametrize("arrays, match", [
    ({"x": np.zeros((3, 8, 8), np.float32), "y": np.zeros(3, int)}, "uint8"),
    ({"x": np.zeros((3, 8, 8), np.uint8), "y": np.zeros(4, int)}, r"labels \(N,\)"),
    ({"x": np.zeros((3, 8, 8), np.uint8), "y": np.array([0, 1, 2]), "classes": np.array(["a", "b"])},
     r"labels in \[0, 2\)"),
    ({"x": np.zeros((3, 8, 8), np.uint8), "y": np.array([0.0, 1.0, 1.0])}, "integer labels"),
    ({"images": np.zeros((3, 8, 8), np.uint8)}, "Expected .* to hold"),
])
def test_malformed_npz_is_a_clear_error(tmp_path, arrays, match):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DomainError, match=match):
        load_domain(f"npz:{tmp_path / 'bad.npz'}", tmp_path, True)


def test_unknown_domain_lists_choices(tmp_path):
    with pytest.raises(DomainError, match="mnist, svhn, usps, cifar10, cifar100, fashion_mnist, tinyimagenet, "
                                          "npz:PATH, folder:PATH or images:PATH"):
        load_domain("mnist-m", tmp_path, True)


@needs_shared(*MNIST_FILES[2:], USPS_NPZ)
def test_real_mnist_and_usps_npz():
    images, labels = parts(load_domain("mnist", SHARED, False, download=False))
    check(images, labels, 10_000)
    images, labels = parts(load_domain(f"npz:{SHARED / 'USPS' / 'usps_esl_16x16.npz'}", SHARED, True))
    check(images, labels, 7_291)
    assert torch.bincount(labels).tolist() == [1194, 1005, 731, 658, 652, 556, 664, 645, 542, 644]


def test_npz_without_labels_is_unlabelled_and_all_training(tmp_path):
    np.savez(tmp_path / "x.npz", x=np.random.randint(0, 256, (7, 16, 16), dtype=np.uint8))
    train = load_domain(f"npz:{tmp_path / 'x.npz'}", tmp_path, True)
    assert train.labels is None and len(train) == 7 and train.images.shape == (7, 3, 32, 32)
    assert train.ids == [f"x.npz:x[{i}]" for i in range(7)]
    assert load_domain(f"npz:{tmp_path / 'x.npz'}", tmp_path, False) is None  # no test split
    np.savez(tmp_path / "xt.npz", x_train=np.zeros((4, 32, 32, 3), np.uint8))
    assert load_domain(f"npz:{tmp_path / 'xt.npz'}", tmp_path, True).labels is None
    assert load_domain(f"npz:{tmp_path / 'xt.npz'}", tmp_path, False) is None


def test_a_class_sorted_npz_is_split_stratified_and_seeded(tmp_path):
    labels = np.repeat(np.arange(4), 25)  # sorted by class: a tail split would test class 3 only
    np.savez(tmp_path / "sorted.npz", x=np.random.randint(0, 256, (100, 8, 8), dtype=np.uint8), y=labels)
    spec = f"npz:{tmp_path / 'sorted.npz'}"
    test = load_domain(spec, tmp_path, False, test_fraction=0.2, split_seed=0)
    train = load_domain(spec, tmp_path, True, test_fraction=0.2, split_seed=0)
    assert torch.bincount(test.labels).tolist() == [5, 5, 5, 5] and len(train) == 80
    assert not set(test.ids) & set(train.ids)
    assert load_domain(spec, tmp_path, False, test_fraction=0.2, split_seed=0).ids == test.ids  # seeded
    assert load_domain(spec, tmp_path, False, test_fraction=0.2, split_seed=1).ids != test.ids


def test_a_flat_folder_at_any_depth_is_unlabelled(tmp_path):
    for i, where in enumerate(["a.png", "2024/b.png", "2024/05/c.jpg"]):
        (tmp_path / "photos" / where).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((12, 12, 3), i, np.uint8)).save(tmp_path / "photos" / where)
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    for spec in (f"folder:{tmp_path / 'photos'}", f"images:{tmp_path / 'photos'}"):
        domain = load_domain(spec, tmp_path, True, size=None)
        assert domain.labels is None and domain.images.shape == (3, 3, 12, 12)
        assert sorted(Path(i).name for i in domain.ids) == ["a.png", "b.png", "c.jpg"]
        assert load_domain(spec, tmp_path, False) is None
    globbed = load_domain(f"images:{tmp_path / 'photos' / '**' / '*.png'}", tmp_path, True, size=None)
    assert sorted(Path(i).name for i in globbed.ids) == ["a.png", "b.png"]


def test_an_empty_folder_and_an_unreadable_image_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DomainError, match="found none"):
        load_domain(f"images:{tmp_path / 'empty'}", tmp_path, True)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DomainError, match="broken.png"):
        load_domain(f"images:{tmp_path / 'bad'}", tmp_path, True)


def test_a_truncated_npz_is_a_clear_error(tmp_path):
    np.savez(tmp_path / "full.npz", x=np.zeros((50, 8, 8), np.uint8), y=np.zeros(50, int))
    data = (tmp_path / "full.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DomainError, match="cut.npz.*truncated"):
        load_domain(f"npz:{tmp_path / 'cut.npz'}", tmp_path, True)


def test_an_image_size_is_kept_and_too_many_images_are_refused_with_the_numbers(tmp_path, monkeypatch):
    np.savez(tmp_path / "big.npz", x=np.random.randint(0, 256, (6, 64, 64, 3), dtype=np.uint8))
    assert load_domain(f"npz:{tmp_path / 'big.npz'}", tmp_path, True, size=64).images.shape == (6, 3, 64, 64)
    assert load_domain(f"npz:{tmp_path / 'big.npz'}", tmp_path, True, size=None).images.shape == (6, 3, 64, 64)
    from adamatch_uan.data import preprocess

    monkeypatch.setattr(preprocess, "available_memory", lambda: 100_000)
    with pytest.raises(DomainError, match=r"6 images of 64×64 need .*iB.*--data.image_size.*up to about 52"):
        load_domain(f"npz:{tmp_path / 'big.npz'}", tmp_path, True, size=64)
