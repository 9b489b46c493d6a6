"""Progress as plain lines, for logs (nohup, SLURM, no terminal) where a progress bar writes ``\\r`` frames."""

from __future__ import annotations

import sys
import time

import lightning as L

# Logged training values shown, if the method logs them, under these names.
SHOWN = {"train/loss": "loss", "train/mask_rate": "mask", "train/lr": "lr"}


def duration(seconds: float) -> str:
    """1h02m, 3m05s or 42s."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class TextProgress(L.Callback):
    """One line every ``every_n_steps`` training steps: step, loss, mask rate, lr, elapsed time and the time
    left; one line per validation with its source accuracy (the one selection reads; a target set's,
    when validation scores one, is a diagnostic left to the logs).

    Args:
        every_n_steps: the interval; None: about 20 lines over ``max_steps`` (every step for short runs).
    """

    def __init__(self, every_n_steps: int | None = None) -> None:
        self.every_n_steps = every_n_steps
        self.started: float | None = None
        self.first_step = 0

    def _interval(self, trainer: L.Trainer) -> int:
        if self.every_n_steps is not None:
            return max(self.every_n_steps, 1)
        return max(trainer.max_steps // 20, 1) if trainer.max_steps and trainer.max_steps > 0 else 50

    @staticmethod
    def _say(line: str) -> None:
        print(line, file=sys.stdout, flush=True)

    def on_train_start(self, trainer, pl_module) -> None:
        self.started, self.first_step = time.monotonic(), trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or self.started is None or step % self._interval(trainer):
            return
        metrics = trainer.callback_metrics
        values = [f"{short} {float(metrics[name]):.4g}" for name, short in SHOWN.items() if name in metrics]
        elapsed = time.monotonic() - self.started
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        done = step - self.first_step
        left = f"  left {duration(elapsed / done * (total - step))}" if total and done > 0 else ""
        self._say(f"step {step}{f'/{total}' if total else ''}  {'  '.join(values)}  elapsed {duration(elapsed)}{left}")

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        if "val/source/acc" in metrics:
            self._say(f"validation at step {trainer.global_step}: source acc {float(metrics['val/source/acc']):.4f}")
