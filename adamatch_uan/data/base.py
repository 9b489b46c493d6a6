"""What the data modules share: loading a domain's splits at one image size, onto one class index,
and the facts a model is built from (the classes, the image size, the evaluation sets)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import lightning as L

from adamatch_uan.data.classes import onto, run_classes
from adamatch_uan.data.domains import Domain, load_domain
from adamatch_uan.data.errors import DomainError
from adamatch_uan.data.preprocess import resizer

DEFAULT_ROOT = Path("~/.cache/adamatch_uan/data")


class DomainDataModule(L.LightningDataModule):
    """A data module whose ``setup`` reads every split (once) and sets ``classes`` (the run's class
    names, from the source) and ``image_size`` (the side every image is resized to).

    The properties below read the data on first use, so the command line can build the model
    from them (``fit.py`` links them to the model's ``num_classes``, ``class_names``, ``image_size``
    and ``eval_names``).
    """

    classes: list[str]
    image_size: int

    def setup(self, stage: str | None = None) -> None:
        raise NotImplementedError

    def _ready(self) -> None:
        if not hasattr(self, "classes"):
            self.setup()

    @property
    def class_names(self) -> list[str]:
        """The run's classes: the source's names, or "0" … "K−1" for a numbered source."""
        self._ready()
        return list(self.classes)

    @property
    def num_classes(self) -> int:
        self._ready()
        return len(self.classes)

    @property
    def input_size(self) -> int:
        """The side of the (square) images the model gets."""
        self._ready()
        return self.image_size

    @property
    def eval_names(self) -> list[str]:
        """The evaluation sets' names, in the order of the test loaders."""
        raise NotImplementedError

    def load(self, spec: str, train: bool, size: int | None) -> Domain | None:
        """One split of ``spec`` at ``size`` (``load_domain`` with this module's root and split options)."""
        hp = self.hparams
        return load_domain(spec, hp.root, train, hp.download, hp.test_fraction, size, hp.split_seed)

    def load_source(self, spec: str) -> tuple[Domain, Domain]:
        """The source's training and test splits at the run's image size, onto the run's classes; sets
        ``classes`` and ``image_size``.

        The image size is ``image_size`` when given, else the side of the source's (square) training
        images, but at least 32: the digit sets (28×28, 16×16) and CIFAR train at 32×32 as the
        official recipe does, larger images at their own size.
        """
        size = self.hparams.image_size
        if size is not None and size <= 0:
            raise DomainError(f"Expected --data.image_size > 0, got {size}")
        train = self.load(spec, True, size)
        if size is None:
            height, width = train.images.shape[-2:]
            if height != width:
                raise DomainError(f"The images of {spec} are {height}×{width}; the models take square images: set "
                                  f"--data.image_size N (the shorter side is resized to N and the centre kept)")
            size = max(height, 32)
            train = dataclasses.replace(train, images=resizer(size)[0](train.images))
        test = self.load(spec, False, size)
        if test is None:
            raise DomainError(f"The source {spec} has no test split: give it labelled held-out images (x_test and "
                              f"y_test in an npz, a test/ folder, or a single x, y that the toolkit splits)")
        self.classes = run_classes(train, test)
        # The size resolved, in the hparams too: Lightning checks that the model's (linked) equals the data's.
        self.image_size = self.hparams.image_size = self._hparams_initial.image_size = size
        return onto(train, self.classes), onto(test, self.classes)

    def load_other(self, spec: str, train: bool) -> Domain | None:
        """A split of another domain at the run's image size, onto the run's classes (after ``load_source``)."""
        domain = self.load(spec, train, self.image_size)
        return onto(domain, self.classes) if domain is not None else None
