"""One labelled domain as a LightningDataModule (plain classification), images held in memory as uint8."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset, default_collate

from adamatch_uan.data.datamodule import DEFAULT_ROOT
from adamatch_uan.data.domains import load_domain
from adamatch_uan.data.sharding import evaluation_loader


def labelled_batch(samples: list) -> dict:
    """Collate (image, label) samples into the training batch every method reads: {"source": (images, labels)}."""
    return {"source": default_collate(samples)}


class SingleDomainDataModule(L.LightningDataModule):
    """A labelled domain: training batches ``{"source": (images, labels)}`` reshuffled every epoch;
    validation on a held-out part of the training set, test on the domain's test split, each a
    loader of ``(images, labels)`` under the evaluation name "source".

    Args:
        domain: a domain spec of ``load_domain``: "cifar10", "cifar100", "tinyimagenet",
            "fashion_mnist", "mnist", ..., "folder:PATH", "npz:PATH".
        root: folder with the built-in datasets (torchvision's layouts).
        download: let torchvision download missing built-in datasets.
        batch_size: images per training step.
        val_fraction: fraction of the training set held out for validation.
        max_train: keep at most this many training images (None: all).
        eval_batch_size: batch size of evaluation loaders.
        test_fraction: test split of npz files or image folders without train/test folders.
        num_classes: classes (npz labels are checked against it).
        resize: side images are resized to; None keeps the domain's own (CIFAR 32, Tiny
            ImageNet 64); 32 also pads 28×28 digits as the domain-adaptation data do.
        seed: seed of the validation split, the subsampling and the shuffling.
    """

    def __init__(self, domain: str = "cifar10", root: str = str(DEFAULT_ROOT), download: bool = True,
                 batch_size: int = 128, val_fraction: float = 0.1, max_train: int | None = None,
                 eval_batch_size: int = 512, test_fraction: float = 0.2, num_classes: int = 10,
                 resize: int | None = None, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()

    def _load(self, train: bool) -> tuple[Tensor, Tensor]:
        hp = self.hparams
        return load_domain(hp.domain, hp.root, train, hp.download, hp.test_fraction, hp.num_classes, hp.resize)

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        hp = self.hparams
        images, labels = self._load(train=True)
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(hp.seed))
        n_val = int(round(len(images) * hp.val_fraction))
        val, train = order[:n_val], order[n_val:][: hp.max_train]
        if len(train) == 0:
            raise ValueError(f"Expected a non-empty training set, got {len(images)} images with val_fraction "
                             f"{hp.val_fraction} and max_train {hp.max_train}; check --data.max_train")
        self.train_set, self.val_set = (images[train], labels[train]), (images[val], labels[val])
        self.test_set = self._load(train=False)

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        return DataLoader(TensorDataset(*self.train_set), batch_size=hp.batch_size, shuffle=True, drop_last=True,
                          generator=torch.Generator().manual_seed(hp.seed), collate_fn=labelled_batch)

    def val_dataloader(self) -> list[DataLoader]:
        return [evaluation_loader(*self.val_set, self.hparams.eval_batch_size)]

    def test_dataloader(self) -> list[DataLoader]:
        return [evaluation_loader(*self.test_set, self.hparams.eval_batch_size)]
