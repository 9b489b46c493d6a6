"""The single-domain DataModule: labelled training batches, held-out validation, the test split."""

import numpy as np
import pytest
import torch

from adamatch_uan.data import SingleDomainDataModule


@pytest.fixture
def npz(tmp_path):
    path = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.integers(0, 256, (50, 20, 20, 3), dtype=np.uint8), y_train=np.arange(50) % 5,
             x_test=rng.integers(0, 256, (12, 20, 20, 3), dtype=np.uint8), y_test=np.arange(12) % 5)
    return path


def test_batches_splits_and_sizes(npz):
    data = SingleDomainDataModule(f"npz:{npz}", batch_size=8, val_fraction=0.2)
    data.setup("fit")
    loader = data.train_dataloader()
    batches = list(loader)
    assert len(batches) == 40 // 8 and set(batches[0]) == {"source"}
    images, labels = batches[0]["source"]
    # 20×20 images train at 32×32, the smallest size the toolkit makes by default
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert data.num_classes == 5 and data.eval_names == ["source"]
    (val,), (test,) = data.val_dataloader(), data.test_dataloader()
    assert sum(len(x) for x, _ in val) == 10 and sum(len(x) for x, _ in test) == 12
    seen = torch.cat([b["source"][1] for b in batches])
    assert len(seen) == 40  # every training image once per epoch
    again = torch.cat([b["source"][0] for b in loader])  # the next epoch
    assert not torch.equal(again, torch.cat([b["source"][0] for b in batches]))  # reshuffled every epoch


def test_image_size_and_max_train(npz):
    data = SingleDomainDataModule(f"npz:{npz}", batch_size=4, max_train=8, image_size=24)
    data.setup("fit")
    assert data.train_set.images.shape == (8, 3, 24, 24) and data.input_size == 24
    with pytest.raises(ValueError, match="max_train"):
        empty = SingleDomainDataModule(f"npz:{npz}", max_train=0)
        empty.setup("fit")
