"""A callback the DDP end-to-end test adds to a run: each process writes what it trained on and holds."""

import os
from pathlib import Path

import lightning as L
import torch


class RankProbe(L.Callback):
    """Per process: the source images of every training batch, and at the end the trained and the
    EMA model's state, saved to ``$DDP_PROBE_DIR/rank<r>.pt``."""

    def __init__(self) -> None:
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(batch["source"][0].clone())

    def on_train_end(self, trainer, pl_module) -> None:
        state = {"batches": self.batches, "world_size": trainer.world_size,
                 "model": {k: v.clone() for k, v in pl_module.model.state_dict().items()},
                 "ema": {k: v.clone() for k, v in pl_module.ema.state_dict().items()}}
        torch.save(state, Path(os.environ["DDP_PROBE_DIR"]) / f"rank{trainer.global_rank}.pt")
