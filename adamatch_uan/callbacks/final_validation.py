"""Every run ends with a validation, and so with a checkpoint, whatever ``val_check_interval`` says."""

from __future__ import annotations

import lightning as L


class FinalValidation(L.Callback):
    """At the last training step (``max_steps``) ask the trainer to stop, which makes Lightning validate
    (and the checkpoint callbacks save) at that step unless it validates there anyway: a 10-step run
    with the default interval of 500 is then tested on a selected checkpoint, and can be resumed."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.max_steps is not None and trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            trainer.should_stop = True
