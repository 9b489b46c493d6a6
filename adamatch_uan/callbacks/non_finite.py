"""Stop a run at its first non-finite loss or gradient, say why, and keep only finite checkpoints."""

from __future__ import annotations

import math

import lightning as L
import torch
from lightning.pytorch.callbacks import OnExceptionCheckpoint
from torch import Tensor, nn

from adamatch_uan.plots import is_norm_layer

ADVICE = ("What usually fixes it: a lower learning rate (--model.init_args.lr), a variance floor for the "
          "mixture layers (--model.init_args.norm_options '{\"var_floor\": 0.01}'), a larger eps, or "
          "gradient clipping (--trainer.gradient_clip_val 1.0).")


class NonFiniteError(RuntimeError):
    """Training produced a NaN or Inf; the message names the step, the loss terms and the layers."""


def non_finite_tensors(model: nn.Module) -> dict[str, list[str]]:
    """Module name → names of its own parameters and buffers that hold a NaN or Inf."""
    found: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        own = [*module._parameters.items(), *module._buffers.items()]
        bad = [n for n, t in own if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            found[name or "<root>"] = bad
    return found


def _value(t: Tensor | float) -> float:
    return float(t.detach()) if isinstance(t, Tensor) else float(t)


class NonFiniteGuard(L.Callback):
    """Raise ``NonFiniteError`` at the first non-finite loss (before its backward) or gradient
    (before the optimiser applies it), so the weights are never overwritten with NaN.

    The message names the step, the value of each term in ``pl_module.loss_terms``, the norm
    layers (and other modules) of ``pl_module.model`` whose parameters or buffers are
    non-finite, the parameters with non-finite gradients, and the options that usually fix
    it. Under DDP the loss check is agreed by every process (one boolean all-reduce per step);
    gradients are all-reduced already, so every process sees a non-finite one. With
    ``FiniteExceptionCheckpoint`` no checkpoint of a non-finite state is written, so
    the run keeps its last finite one (``checkpoints/last.ckpt``).
    """

    def on_before_backward(self, trainer, pl_module, loss: Tensor) -> None:
        finite = bool(torch.isfinite(loss.detach()).all())
        if trainer.world_size > 1:  # under DDP every process stops together, or the others would wait forever
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            return
        terms = getattr(pl_module, "loss_terms", None) or {}
        described = ", ".join(f"{k} = {_value(v):.4g}" for k, v in terms.items())
        bad_terms = [k for k, v in terms.items() if not math.isfinite(_value(v))]
        lines = [f"Non-finite training loss at step {trainer.global_step} (loss = {_value(loss)})"
                 + (f"; loss terms: {described}; non-finite: {', '.join(bad_terms) or 'none'}" if terms else "")]
        raise NonFiniteError("\n".join(lines + self._where(pl_module) + [ADVICE]))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        model = getattr(pl_module, "model", pl_module)
        bad = [n for n, p in model.named_parameters() if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
        if bad:
            raise NonFiniteError("\n".join([f"Non-finite gradients at step {trainer.global_step} (finite loss) in: "
                                            f"{', '.join(bad[:10])}" + (" ..." if len(bad) > 10 else "")]
                                           + self._where(pl_module) + [ADVICE]))

    @staticmethod
    def _where(pl_module) -> list[str]:
        model = getattr(pl_module, "model", pl_module)
        found = non_finite_tensors(model)
        norms = {n for n, m in model.named_modules() if is_norm_layer(m)}
        layers = [f"{n} ({', '.join(v)})" for n, v in found.items() if n in norms]
        others = [f"{n} ({', '.join(v)})" for n, v in found.items() if n not in norms]
        return [f"Norm layers with non-finite values: {', '.join(layers) or 'none'}"
                + (f"; other modules: {', '.join(others)}" if others else "")]


class FiniteExceptionCheckpoint(OnExceptionCheckpoint):
    """Lightning's checkpoint on exception, skipped when the module holds a NaN or Inf (a
    checkpoint to resume from must be finite; the last regular one stays) and before the first
    training step (a model that never trained is nothing to resume)."""

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if trainer.global_step == 0 or non_finite_tensors(pl_module):
            return
        super().on_exception(trainer, pl_module, exception)
