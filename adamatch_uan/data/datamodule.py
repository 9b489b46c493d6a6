"""A (source, target) pair of domains as a LightningDataModule, images held in memory as uint8."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from adamatch_uan.data.base import DEFAULT_ROOT, DomainDataModule
from adamatch_uan.data.domains import Domain
from adamatch_uan.data.sharding import evaluation_loader
from adamatch_uan.data.splits import stratified_split

RANK_SEED_STRIDE = 1_000_003  # process r > 0 samples from seed + r · stride: streams apart for any seed


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


class DomainPairDataModule(DomainDataModule):
    """Source (labelled) and target (unlabelled in training; labelled or not on disk) domains.

    The source defines the classes (``classes``); a labelled target's classes are mapped onto
    them by name (``data.classes``). Validation: the held-out part of the source training set
    ("source"), which checkpoint selection monitors; the target's test set only with
    ``val_target`` (a diagnostic for learning curves, never for choosing: docs/METHOD.md,
    "Selection protocol"). Test: the source and (labelled) target test sets, in that order. ``target_train`` keeps the target's training images with where each came
    from (the images a run adapts to, and predicts at its end).

    Args:
        source: domain spec, e.g. "mnist" or "npz:/path/file.npz" (see ``load_domain``).
        target: domain spec of the target, e.g. "images:/path/photos" for unlabelled images.
        root: folder with the built-in datasets (torchvision layout).
        download: let torchvision download missing built-in datasets.
        batch_size: source images per step and process; the target batch is ``uratio`` times larger.
        uratio: target-to-source batch ratio.
        val_fraction: fraction of the source training set held out for validation (stratified).
        max_source: keep at most this many source training images (None: all).
        max_target: keep at most this many target training images (None: all).
        eval_batch_size: batch size of evaluation loaders.
        test_fraction: test split of labelled npz files and image folders without their own (stratified).
        image_size: side every image is made (``preprocess``); None: the source's images' own side,
            but at least 32 (digits and CIFAR at 32×32, larger images at their size).
        split_seed: seed of the test splits made from npz files and folders without their own.
        seed: seed of the subsampling, the validation split and the samplers.
        val_target: also score the (labelled) target's test set at each validation, as "target":
            an opt-in diagnostic (learning curves); selection never reads it.
    """

    def __init__(self, source: str = "mnist", target: str = "svhn", root: str = str(DEFAULT_ROOT),
                 download: bool = True, batch_size: int = 64, uratio: int = 3, val_fraction: float = 0.1,
                 max_source: int | None = None, max_target: int | None = None, eval_batch_size: int = 256,
                 test_fraction: float = 0.2, image_size: int | None = None, split_seed: int = 0,
                 seed: int = 0, val_target: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        for name, value in (("batch_size", batch_size), ("uratio", uratio), ("eval_batch_size", eval_batch_size)):
            if value < 1:
                raise ValueError(f"Expected --data.{name} ≥ 1, got {value}")
        if not 0 <= val_fraction < 1 or not 0 < test_fraction < 1:
            raise ValueError(f"Expected 0 ≤ --data.val_fraction < 1 and 0 < --data.test_fraction < 1, got "
                             f"{val_fraction} and {test_fraction}")

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "source_train"):
            return
        hp = self.hparams
        source, self.source_test = self.load_source(hp.source)
        kept, held = stratified_split(source.labels, len(source), hp.val_fraction, hp.seed)
        generator = torch.Generator().manual_seed(hp.seed)
        kept = kept[torch.randperm(len(kept), generator=generator)][: hp.max_source]
        self.source_train, self.source_val = source.subset(kept), source.subset(held)
        target = self.load_other(hp.target, train=True)  # its labels, if any, are dropped by train_dataloader
        # In the files' order (the order of the predictions written at the end of a run).
        self.target_train = target.subset(torch.randperm(len(target), generator=generator)[: hp.max_target].sort().values)
        self.target_test = self.load_other(hp.target, train=False) if target.labels is not None else None
        if len(self.source_train) == 0 or len(self.target_train) == 0:
            raise ValueError(f"Expected non-empty source and target training sets, got {len(self.source_train)} and "
                             f"{len(self.target_train)} images; check --data.max_source/max_target")

    def target_images(self) -> Tensor:
        """The target's training images (uint8, no labels): what AdaBN recalibrates on."""
        self._ready()
        return self.target_train.images

    @property
    def target_labelled(self) -> bool:
        self._ready()
        return self.target_test is not None

    @property
    def eval_names(self) -> list[str]:
        return ["source", "target"] if self.target_labelled else ["source"]

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        # A resumed run's trainer has its global step back when the stream starts.
        start = lambda: self.trainer.global_step if self.trainer is not None else 0  # noqa: E731
        rank = self.trainer.global_rank if self.trainer is not None else 0
        source = (self.source_train.images, self.source_train.labels)
        return DataLoader(PairedBatches(source, self.target_train.images, hp.batch_size, hp.uratio, hp.seed, start,
                                        rank), batch_size=None)

    def _loaders(self, domains: list[Domain | None]) -> list[DataLoader]:
        return [evaluation_loader(d.images, d.labels, self.hparams.eval_batch_size) for d in domains if d is not None]

    def val_dataloader(self) -> list[DataLoader]:
        return self._loaders([self.source_val, self.target_test if self.hparams.val_target else None])

    def test_dataloader(self) -> list[DataLoader]:
        return self._loaders([self.source_test, self.target_test])
