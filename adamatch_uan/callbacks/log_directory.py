"""Where a callback writes its files, read without a collective."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger


def log_directory(trainer: L.Trainer) -> Path:
    """``trainer.log_dir`` as this process sees it, without the broadcast ``trainer.log_dir`` makes:
    under DDP that is a collective, and the callbacks write from the first process alone."""
    if not trainer.loggers:
        return Path(trainer.default_root_dir)
    logger = trainer.loggers[0]
    directory = logger.log_dir if isinstance(logger, (TensorBoardLogger, CSVLogger)) else logger.save_dir
    return Path(directory or trainer.default_root_dir)
