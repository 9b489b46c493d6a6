"""The wall time of each validation, logged beside its metrics (time-to-accuracy curves)."""

from __future__ import annotations

import time

import lightning as L


class ElapsedTime(L.Callback):
    """Logs ``time/elapsed_s``, the seconds since training started in this process plus those of the run
    before a resume (read from the checkpoint), at the end of every validation, to every logger, at the
    step the validation's metrics are logged at."""

    def __init__(self) -> None:
        self.started: float | None = None
        self.before = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return self.before + (time.monotonic() - self.started if self.started is not None else 0.0)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self.started is None:
            return
        step = trainer.fit_loop.epoch_loop._batches_that_stepped  # the step the validation's rows carry
        for logger in trainer.loggers:
            logger.log_metrics({"time/elapsed_s": self.elapsed()}, step=step)

    def state_dict(self) -> dict:
        return {"elapsed_s": self.elapsed()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.before = float(state_dict.get("elapsed_s", 0.0))
