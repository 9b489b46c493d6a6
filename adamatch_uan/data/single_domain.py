"""One labelled domain as a LightningDataModule (plain classification), images held in memory as uint8."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset, default_collate

from adamatch_uan.data.base import DEFAULT_ROOT, DomainDataModule
from adamatch_uan.data.sharding import evaluation_loader
from adamatch_uan.data.splits import stratified_split


def labelled_batch(samples: list) -> dict:
    """Collate (image, label) samples into the training batch every method reads: {"source": (images, labels)}."""
    return {"source": default_collate(samples)}


class SingleDomainDataModule(DomainDataModule):
    """A labelled domain: training batches ``{"source": (images, labels)}`` reshuffled every epoch;
    validation on a held-out part of the training set, test on the domain's test split, each a
    loader of ``(images, labels)`` under the evaluation name "source".

    Args:
        domain: a domain spec of ``load_domain``: "cifar10", "cifar100", "tinyimagenet",
            "fashion_mnist", "mnist", ..., "folder:PATH", "npz:PATH".
        root: folder with the built-in datasets (torchvision's layouts).
        download: let torchvision download missing built-in datasets.
        batch_size: images per training step.
        val_fraction: fraction of the training set held out for validation (stratified).
        max_train: keep at most this many training images (None: all).
        eval_batch_size: batch size of evaluation loaders.
        test_fraction: test split of npz files or image folders without their own (stratified).
        image_size: side every image is made (``preprocess``); None: the domain's images' own side,
            but at least 32 (digits and CIFAR at 32×32, Tiny ImageNet at 64×64).
        split_seed: seed of the test splits made from npz files and folders without their own.
        seed: seed of the validation split, the subsampling and the shuffling.
    """

    def __init__(self, domain: str = "cifar10", root: str = str(DEFAULT_ROOT), download: bool = True,
                 batch_size: int = 128, val_fraction: float = 0.1, max_train: int | None = None,
                 eval_batch_size: int = 512, test_fraction: float = 0.2, image_size: int | None = None,
                 split_seed: int = 0, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value < 1:
                raise ValueError(f"Expected --data.{name} ≥ 1, got {value}")

    @property
    def eval_names(self) -> list[str]:
        return ["source"]

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        hp = self.hparams
        train, self.test_set = self.load_source(hp.domain)
        kept, held = stratified_split(train.labels, len(train), hp.val_fraction, hp.seed)
        kept = kept[torch.randperm(len(kept), generator=torch.Generator().manual_seed(hp.seed))][: hp.max_train]
        if len(kept) == 0:
            raise ValueError(f"Expected a non-empty training set, got {len(train)} images with val_fraction "
                             f"{hp.val_fraction} and max_train {hp.max_train}; check --data.max_train")
        self.train_set, self.val_set = train.subset(kept), train.subset(held)

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        return DataLoader(TensorDataset(self.train_set.images, self.train_set.labels), batch_size=hp.batch_size,
                          shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(hp.seed),
                          collate_fn=labelled_batch)

    def val_dataloader(self) -> list[DataLoader]:
        return [evaluation_loader(self.val_set.images, self.val_set.labels, self.hparams.eval_batch_size)]

    def test_dataloader(self) -> list[DataLoader]:
        return [evaluation_loader(self.test_set.images, self.test_set.labels, self.hparams.eval_batch_size)]
