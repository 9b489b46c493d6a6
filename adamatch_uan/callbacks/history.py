"""A run's history continues when it resumes: CSV rows are kept, never deleted.

Lightning's ``CSVLogger`` deletes ``metrics.csv`` when its directory is not empty. ``HistoryLogger``
appends instead (a new column rewrites the header and keeps every row). Before a run resumes
from a checkpoint taken after G steps, ``continue_history`` drops the rows of steps ≥ G from
its CSV files: they were written by the part of the run after the checkpoint, which the resumed
run trains again (rows are logged with the step of the batch that wrote them; a validation after
G steps with step G − 1), so N steps, an interruption and a resume leave the rows of N steps.
``ContinuedSteps`` makes the resumed run log with the steps the uninterrupted one would have.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

HISTORY_FILES = ("metrics.csv", "gradient_variance.csv")


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, keeping the rows and the header of an existing ``metrics.csv``."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = list(csv.DictReader(f).fieldnames or [])


class HistoryLogger(CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` grows across resumes instead of starting again."""

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


class ContinuedSteps(L.Callback):
    """Loggers write each row with Lightning's count of batches that stepped the optimiser, which a run
    resumed from a checkpoint taken in a validation or on an interruption gets one off: every later row
    would be logged a step away from where the uninterrupted run logs it. At the start of each batch
    this sets the count to the global step (the batch's number), as an uninterrupted run has it."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.accumulate_grad_batches == 1:  # otherwise the two counts differ by design
            trainer.fit_loop.epoch_loop._batches_that_stepped = trainer.global_step


def continue_history(run: Path, step: int) -> None:
    """Drop the rows of steps ≥ ``step`` from the run's CSV histories (``HISTORY_FILES``)."""
    for name in HISTORY_FILES:
        path = run / name
        if not path.is_file():
            continue
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            fields, rows = reader.fieldnames or [], list(reader)
        kept = [row for row in rows if not row.get("step") or int(float(row["step"])) < step]
        if len(kept) == len(rows):
            continue
        partial = path.with_name(path.name + ".partial")
        with partial.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(kept)
        os.replace(partial, path)
