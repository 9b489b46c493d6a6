"""Plain classification of one labelled domain: the UAN paper's first experiment ("a simplified scenario")."""

from __future__ import annotations

from collections.abc import Sequence

from adamatch_uan.methods.source_only import SourceOnly


class Supervised(SourceOnly):
    """Cross-entropy on augmented views of one labelled domain, with the usual CIFAR recipe as defaults.

    It is ``SourceOnly`` (the same backbone and norm building, optimiser groups, metrics and
    training step; batches ``{"source": (images, labels)}`` from ``SingleDomainDataModule``)
    with the defaults of plain classification instead of AdaMatch's: SGD with momentum 0.9,
    lr 0.05 on a cosine schedule to 0, weight decay 5e-4 on conv/linear weights only, random
    crops (shifts of up to 4 px with reflect padding) and flips for natural images (``flip``
    False for digits), and the trained model evaluated directly (no EMA copy).

    Args:
        lr: base learning rate of SGD.
        lr_schedule: "cosine", "step" or "adamatch" (``base.lr_factor``).
        weight_decay: on conv/linear weights only.
        flip: random horizontal flips (natural images; off for digits).
        ema_decay: evaluate an EMA copy with this decay; None: the trained model.
        eval_names: one name per evaluation loader ("source", the labelled domain).
        **base: see ``DomainAdaptationMethod`` (backbone, norm, norm_at, norm_options, ...).
    """

    def __init__(self, lr: float = 0.05, lr_schedule: str = "cosine", weight_decay: float = 5e-4, flip: bool = True,
                 ema_decay: float | None = None, eval_names: Sequence[str] = ("source",), **base) -> None:
        super().__init__(lr=lr, lr_schedule=lr_schedule, weight_decay=weight_decay, flip=flip, ema_decay=ema_decay,
                         eval_names=eval_names, **base)
        self.save_hyperparameters()
