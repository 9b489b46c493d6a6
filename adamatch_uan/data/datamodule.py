"""A (source, target) pair of domains as a LightningDataModule, images held in memory as uint8."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from adamatch_uan.data.domains import load_domain
from adamatch_uan.data.sharding import evaluation_loader

RANK_SEED_STRIDE = 1_000_003  # process r > 0 samples from seed + r · stride: streams apart for any seed

DEFAULT_ROOT = Path("~/.cache/adamatch_uan/data")


def infinite_indices(size: int, generator: torch.Generator) -> Iterator[int]:
    """Random permutations of range(size), one after another, forever."""
    while True:
        yield from torch.randperm(size, generator=generator).tolist()


class PairedBatches(IterableDataset):
    """Endless training batches ``{"source": (images, labels), "target": images}``.

    Each domain has its own infinite random sampler, so an epoch never truncates one domain
    to the other's length. Target labels are not part of the batch. The stream is a function
    of the seed and the batch's position alone: a stream that starts at ``start()`` (the global
    step a resumed run restarts from, read when iteration begins) replays the index draws of the
    batches before it, without gathering their images, and continues exactly as an
    uninterrupted run would, however far a loader prefetches. Under DDP each process ``rank``
    draws its own stream (from ``seed + rank · RANK_SEED_STRIDE``; rank 0's is the one-process
    stream), so the global batch is ``processes × batch_size`` different images.
    """

    def __init__(self, source: tuple[Tensor, Tensor], target: Tensor, batch_size: int, uratio: int, seed: int,
                 start: Callable[[], int] | None = None, rank: int = 0) -> None:
        self.source, self.target = source, target
        self.batch_size, self.uratio, self.seed, self.rank = batch_size, uratio, seed, rank
        self.start = start or (lambda: 0)
        self._stream: Iterator[dict] | None = None

    def __iter__(self) -> Iterator[dict]:
        # One stream for the object's lifetime: an epoch cut short (--trainer.limit_train_batches)
        # continues where the last one stopped instead of replaying the same batches.
        if self._stream is None:
            self._stream = self._batches(self.start())
        return self._stream

    def _batches(self, start: int) -> Iterator[dict]:
        generator = torch.Generator().manual_seed(self.seed + self.rank * RANK_SEED_STRIDE)
        s = infinite_indices(len(self.source[0]), generator)
        t = infinite_indices(len(self.target), generator)
        images, labels = self.source
        for _ in range(start):  # the draws of the batches before start, in the same order
            for _ in range(self.batch_size):
                next(s)
            for _ in range(self.batch_size * self.uratio):
                next(t)
        while True:
            si = torch.tensor([next(s) for _ in range(self.batch_size)])
            ti = torch.tensor([next(t) for _ in range(self.batch_size * self.uratio)])
            yield {"source": (images[si], labels[si]), "target": self.target[ti]}


class DomainPairDataModule(L.LightningDataModule):
    """Source (labelled) and target (unlabelled in training) domains.

    Validation: the held-out part of the source training set ("source"), then the target
    test set ("target"); checkpoint selection should monitor the source set only. Test: the
    source and the target test sets, in that order.

    Args:
        source: domain spec, e.g. "mnist" or "npz:/path/file.npz" (see ``load_domain``).
        target: domain spec of the target.
        root: folder with the built-in datasets (torchvision layout).
        download: let torchvision download missing built-in datasets.
        batch_size: source images per step and process; the target batch is ``uratio`` times larger.
        uratio: target-to-source batch ratio.
        val_fraction: fraction of the source training set held out for validation.
        max_source: keep at most this many source training images (None: all).
        max_target: keep at most this many target training images (None: all).
        eval_batch_size: batch size of evaluation loaders.
        test_fraction: test split of npz files holding a single x, y.
        num_classes: classes (labels are checked against it).
        seed: seed of the subsampling, the validation split and the samplers.
    """

    def __init__(self, source: str = "mnist", target: str = "svhn", root: str = str(DEFAULT_ROOT),
                 download: bool = True, batch_size: int = 64, uratio: int = 3, val_fraction: float = 0.1,
                 max_source: int | None = None, max_target: int | None = None, eval_batch_size: int = 256,
                 test_fraction: float = 0.2, num_classes: int = 10, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()

    def _load(self, spec: str, train: bool) -> tuple[Tensor, Tensor]:
        hp = self.hparams
        return load_domain(spec, hp.root, train, hp.download, hp.test_fraction, hp.num_classes)

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "source_train"):
            return
        hp = self.hparams
        generator = torch.Generator().manual_seed(hp.seed)
        images, labels = self._load(hp.source, train=True)
        order = torch.randperm(len(images), generator=generator)
        n_val = int(round(len(images) * hp.val_fraction))
        val, train = order[:n_val], order[n_val:][: hp.max_source]
        self.source_train, self.source_val = (images[train], labels[train]), (images[val], labels[val])
        target_images, _ = self._load(hp.target, train=True)  # target training labels are dropped here
        keep = torch.randperm(len(target_images), generator=generator)[: hp.max_target]
        self.target_train = target_images[keep]
        self.source_test, self.target_test = self._load(hp.source, train=False), self._load(hp.target, train=False)
        if len(self.source_train[0]) == 0 or len(self.target_train) == 0:
            raise ValueError("Expected non-empty source and target training sets; check --data.max_source/max_target")

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        # A resumed run's trainer has its global step back when the stream starts.
        start = lambda: self.trainer.global_step if self.trainer is not None else 0  # noqa: E731
        rank = self.trainer.global_rank if self.trainer is not None else 0
        return DataLoader(PairedBatches(self.source_train, self.target_train, hp.batch_size, hp.uratio, hp.seed, start,
                                        rank), batch_size=None)

    def val_dataloader(self) -> list[DataLoader]:
        return [evaluation_loader(*pair, self.hparams.eval_batch_size) for pair in (self.source_val, self.target_test)]

    def test_dataloader(self) -> list[DataLoader]:
        return [evaluation_loader(*pair, self.hparams.eval_batch_size) for pair in (self.source_test, self.target_test)]
