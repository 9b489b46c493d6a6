"""``python -m adamatch_uan.predict RUN_DIR IMAGES... [--checkpoint best|last|PATH] [--out FILE]``:
a finished run's predictions for any images, as a CSV file.

IMAGES are folders (any depth), image files, glob patterns, ``.npz`` files or domain specs
(``classifier.Images``). They are made what the run trained on (its image size, grey → RGB,
digits padded) and classified by the selected checkpoint's evaluated (EMA) model with the
run's context rule, in batches, with a progress bar, on the GPU when there is one. One row
per image: ``image, class, confidence, p_<class>...``. The file (default
``RUN_DIR/predictions-<time>.csv``) is never overwritten.
"""

from __future__ import annotations

import sys
import time
from argparse import ArgumentError
from pathlib import Path

from jsonargparse import ArgumentParser
from torch.utils.data import DataLoader

from adamatch_uan.classifier import CHECKPOINT_CHOICES, Predictions, load
from adamatch_uan.cli.errors import UserError, condense, report
from adamatch_uan.cli.console import quiet_lightning
from adamatch_uan.data import describe


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m adamatch_uan.predict", exit_on_error=False, default_env=False,
                       description="A finished run's predictions for any images, as a CSV file.")
    p.add_argument("run_dir", type=str, help="The run directory fit wrote.")
    p.add_argument("images", type=str, nargs="+",
                   help="Folders, image files, glob patterns, .npz files or domain specs (npz:, folder:, images:, mnist, ...).")
    p.add_argument("--checkpoint", type=str, default="best",
                   help=f"Which weights: {' or '.join(CHECKPOINT_CHOICES)} (the run's) or a .ckpt path.")
    p.add_argument("--out", type=str | None, default=None, help="CSV file to write (default RUN_DIR/predictions-<time>.csv).")
    p.add_argument("--batch_size", type=int, default=256, help="Images per batch.")
    p.add_argument("--root", type=str | None, default=None, help="Folder of built-in datasets (default: the run's).")
    return p


def main(args: list[str] | None = None) -> Path:
    """Write the predictions; return the file's path.

    Raises:
        UserError: bad options, a run without a checkpoint, unreadable images, an existing --out.
    """
    try:
        config = parser().parse_args(args)
    except ArgumentError as error:
        raise UserError(f"{condense(str(error))}\n(python -m adamatch_uan.predict --help lists the options)") from error
    if config.batch_size < 1:
        raise UserError(f"Expected --batch_size ≥ 1, got {config.batch_size}")
    run = Path(config.run_dir)
    out = Path(config.out) if config.out else run / f"predictions-{time.strftime('%Y%m%d-%H%M%S')}.csv"
    if out.exists():
        raise UserError(f"{out} exists; choose another --out (nothing is ever overwritten)")
    classifier = load(run, config.checkpoint)
    if config.root is not None:
        classifier.root = config.root
    images, ids, resized = classifier.read(config.images)
    if resized:
        print(f"{resized} of {len(images)} images {describe(classifier.image_size)}, as the run's were", file=sys.stderr)
    with quiet_lightning():
        import lightning as L

        trainer = L.Trainer(accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                            enable_model_summary=False)
        batches = trainer.predict(classifier.module, DataLoader(images, batch_size=config.batch_size))
    import torch

    written = Predictions(ids, torch.cat(batches).cpu(), classifier.class_names).write_csv(out)
    print(f"{len(ids)} predictions ({', '.join(classifier.class_names[:10])}"
          f"{' ...' if len(classifier.class_names) > 10 else ''}) written to {written}")
    return written


def run() -> None:
    """``python -m adamatch_uan.predict``: ``main``, a user error ending in one short message and status 2."""
    report(main)


if __name__ == "__main__":
    run()
