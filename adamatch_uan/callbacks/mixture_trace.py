"""How a learned mixture moves during training: gradient sizes, distance travelled, fit to the batch.

For every layer of ``pl_module.model`` with ``mixture_parameters()`` (UAN), every
``every_n_steps`` global steps, after the backward pass and before the optimiser step, one
CSV row per (step, layer, quantity) in ``<trainer.log_dir>/mixture_trace.csv``:

    grad_rms/<name>     RMS of the gradient of ``mean``, ``raw_var``, ``prior_logits``
                        (everything the backward gave them: task loss and any fit term)
    grad_rms/conv       median over the model's conv weights of their gradient RMS (for scale)
    moved/mean          RMS over (k, c) of (μ − μ₀) / s_c, s_c the channel's std (below)
    moved/log_var       RMS of log(σ² / σ₀²)
    moved/weight        RMS of λ − λ₀ (all contexts)
    gap/mean            RMS of (μ − ᾱ) / s_c, ᾱ, δ̄² the running batch statistics
    gap/log_var         median over (k, c) of |log(σ² / δ̄²)| (a median: a component on a spike has δ̄² ≈ 0)
    scale               mean over channels of s_c = the running mixture's std (Σ λ(δ̄² + ᾱ²) − (Σ λ ᾱ)²)^½
    nll                 the layer's latest likelihood term (``mixture_fit="likelihood"``)

The gap rows say how far the paper's inference rule (α → μ, δ² → σ²) is from the
statistics the network was trained with. μ₀, σ₀², λ₀ are the values when fitting starts.
"""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn

from adamatch_uan.callbacks.log_directory import log_directory

COLUMNS = ("step", "layer", "quantity", "value")


def _rms(t: Tensor) -> float:
    return t.detach().double().square().mean().sqrt().item()


def mixture_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Layers with a learned mixture (``mixture_parameters()``), by module name."""
    return {name: m for name, m in model.named_modules() if hasattr(m, "mixture_parameters")}


@torch.no_grad()
def mixture_state(layer: nn.Module) -> dict[str, Tensor]:
    """A UAN layer's μ, σ², λ and running α, δ², detached float64 copies."""
    return {"mean": layer.mean.double().clone(), "var": layer.var.double().clone(),
            "weight": layer.weights.double().clone(), "alpha": layer.running_mean.double().clone(),
            "delta2": layer.running_var.double().clone()}


def trace_quantities(now: dict[str, Tensor], start: dict[str, Tensor]) -> dict[str, float]:
    """The ``moved/*``, ``gap/*`` and ``scale`` quantities of the module docstring."""
    lam = now["weight"].mean(0)  # (K, C), averaged over contexts
    second = (lam * (now["delta2"] + now["alpha"] ** 2)).sum(0) - (lam * now["alpha"]).sum(0) ** 2
    scale = second.clamp_min(1e-30).sqrt()  # (C,)
    return {"moved/mean": _rms((now["mean"] - start["mean"]) / scale),
            "moved/log_var": _rms(torch.log(now["var"] / start["var"])),
            "moved/weight": _rms(now["weight"] - start["weight"]),
            "gap/mean": _rms((now["mean"] - now["alpha"]) / scale),
            "gap/log_var": torch.log(now["var"] / now["delta2"].clamp_min(1e-30)).abs().median().item(),
            "scale": scale.mean().item()}


class MixtureTrace(L.Callback):
    """Write the quantities of the module docstring every ``every_n_steps`` steps.

    Args:
        every_n_steps: interval in global steps (step 0 included).
        path: CSV file (default ``<trainer.log_dir>/mixture_trace.csv``).
    """

    def __init__(self, every_n_steps: int = 25, path: str | None = None) -> None:
        if every_n_steps < 1:
            raise ValueError(f"Expected every_n_steps >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.path = Path(path) if path is not None else None
        self._start: dict[str, dict[str, Tensor]] = {}

    def on_fit_start(self, trainer, pl_module) -> None:
        self._start = {name: mixture_state(m) for name, m in mixture_layers(pl_module.model).items()}

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step % self.every_n_steps or not trainer.is_global_zero or not self._start:
            return
        model = pl_module.model
        convs = [_rms(m.weight.grad) for m in model.modules()
                 if isinstance(m, nn.modules.conv._ConvNd) and m.weight.grad is not None]
        rows = [("model", "grad_rms/conv", float(torch.tensor(convs).median())) if convs else None]
        for name, layer in mixture_layers(model).items():
            for pname, p in zip(("prior_logits", "mean", "raw_var"), layer.mixture_parameters()):
                if p.grad is not None:
                    rows.append((name, f"grad_rms/{pname}", _rms(p.grad)))
            rows += [(name, q, v) for q, v in trace_quantities(mixture_state(layer), self._start[name]).items()]
            if getattr(layer, "last_nll", None) is not None:
                rows.append((name, "nll", layer.last_nll.item()))
        path = self.path or log_directory(trainer) / "mixture_trace.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with path.open("a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(COLUMNS)
            writer.writerows((trainer.global_step, *row[:2], f"{row[2]:.6g}") for row in rows if row is not None)
