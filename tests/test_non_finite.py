"""The non-finite guard: the first NaN loss or gradient stops the run, says where, keeps finite checkpoints."""

import math
import os
import subprocess
import sys

import lightning as L
import pytest
import torch

from adamatch_uan.callbacks.non_finite import FiniteExceptionCheckpoint, NonFiniteError, NonFiniteGuard, non_finite_tensors
from adamatch_uan.methods import AdaMatch

from conftest import ROOT, quiet_trainer, smoke_args, toy_eval_batches, toy_train_batches


class InjectNaN(L.Callback):
    """At the start of step ``at_step``, fill the first conv's weight with NaN (a run that blows up)."""

    def __init__(self, at_step: int = 4) -> None:
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            with torch.no_grad():
                pl_module.model.convs[0].weight.fill_(math.nan)


def test_guard_stops_at_the_first_non_finite_loss_and_names_step_terms_and_layers(tmp_path):
    model = AdaMatch(norm="uan", image_size=32)
    trainer = quiet_trainer(max_steps=10, enable_checkpointing=True,
                            callbacks=[InjectNaN(4), NonFiniteGuard(), FiniteExceptionCheckpoint(tmp_path)])
    with pytest.raises(NonFiniteError) as error:
        trainer.fit(model, train_dataloaders=toy_train_batches(10))
    message = str(error.value)
    assert trainer.global_step == 4  # stopped at once: the NaN step was never applied
    assert "step 4" in message and "source = nan" in message and "norms.0.layer" in message
    assert "--model.init_args.lr" in message and "var_floor" in message
    assert not list(tmp_path.glob("*.ckpt"))  # the module held NaN: no checkpoint of it


def test_non_finite_gradient_with_a_finite_loss_is_stopped_before_the_step():
    class NaNGradient(L.Callback):
        def on_after_backward(self, trainer, pl_module):
            if trainer.global_step == 2:
                pl_module.model.head.weight.grad[0, 0] = math.inf

    model = AdaMatch(norm="bn")
    trainer = quiet_trainer(max_steps=10, callbacks=[NaNGradient(), NonFiniteGuard()])
    with pytest.raises(NonFiniteError, match=r"gradients at step 2.*model\.head\.weight|gradients at step 2.*head\.weight"):
        trainer.fit(model, train_dataloaders=toy_train_batches(10))
    assert not non_finite_tensors(model)  # the weights were never touched by the Inf


def test_a_finite_run_is_untouched():
    model = AdaMatch(norm="uan")
    trainer = quiet_trainer(max_steps=3, callbacks=[NonFiniteGuard()])
    trainer.fit(model, train_dataloaders=toy_train_batches(3), val_dataloaders=[toy_eval_batches(), toy_eval_batches()])
    assert trainer.global_step == 3


def test_cli_exits_non_zero_keeps_the_last_finite_checkpoint_and_writes_no_results(data, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "adamatch_uan.fit", *smoke_args(data, run, 12),
                           "--trainer.callbacks+=test_non_finite.InjectNaN", "--trainer.callbacks.at_step", "7"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "error: Non-finite training loss at step 7" in done.stderr and "Traceback" not in done.stderr
    assert not (run / "results.json").exists() and not (run / "checkpoints" / "on_exception.ckpt").exists()
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 6
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values() if t.is_floating_point())
