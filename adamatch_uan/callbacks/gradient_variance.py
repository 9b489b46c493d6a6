"""Gradient variance per layer during training (docs/METHOD.md §6), logged and written as a tidy CSV.

For a parameter tensor W with gradient g = ∂L/∂W of n elements, the recorded value is the
element-wise (population) variance  Var(g) = (1/n) Σ_i (g_i − ḡ)²,  ḡ = (1/n) Σ_i g_i,
as the UAN authors compute it (``np.var`` of the gradient tensor).

Kinds of gradient (column ``kind`` of the CSV):
    total          ∂L/∂W of the training loss, read from ``.grad`` after Lightning's backward
                   (no extra pass; with gradient accumulation it is the accumulated gradient).
    source, target (``split=True``) the gradients of the loss terms the method exposes as
                   ``pl_module.loss_terms`` (AdaMatch: L_S and μ(t)·L_T, which sum to the
                   total); one extra backward per term, with ``torch.autograd.grad``.
    logits_source, logits_target
                   (``mode="logits"``, the authors' variant) ∂(Σ logits)/∂W on the weak views
                   of the current source batch and of the current target batch (when the
                   batch has one), each in its own training-mode forward pass.

Measuring never changes the model: gradients of extra passes go through
``torch.autograd.grad`` (``.grad`` untouched), extra forward passes run under
``frozen_stats`` (running statistics restored) and ``fork_rng`` (the augmentation RNG
stream of training is not consumed), and nothing is stepped.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path

import lightning as L
import torch
from torch import Tensor

from adamatch_uan.callbacks.log_directory import log_directory
from adamatch_uan.norm import SOURCE, TARGET, frozen_stats

COLUMNS = ("step", "epoch", "layer", "parameter", "kind", "variance")
MODES = ("loss", "logits")


def gradient_variance(grad: Tensor) -> float:
    """Var(g) = mean((g − mean(g))²) over all elements, in float64."""
    return grad.detach().double().var(correction=0).item()


def split_name(name: str) -> tuple[str, str]:
    """'model.norms.0.layer.mean' → ('model.norms.0.layer', 'mean')."""
    layer, _, parameter = name.rpartition(".")
    return layer, parameter


class GradientVariance(L.Callback):
    """Record the gradient variance of every trainable parameter tensor of ``pl_module.model``.

    When: at the first training step of every epoch and every ``every_n_steps`` global
    steps (``None``: epochs only). Output: ``grad_var/<kind>/max`` and ``grad_var/<kind>/mean``
    (over parameter tensors) sent to every logger of the trainer, and one CSV row per
    (step, parameter tensor, kind) appended to ``path`` (default
    ``<trainer.log_dir>/gradient_variance.csv``) with columns ``COLUMNS``.

    Args:
        every_n_steps: measuring interval in global steps.
        mode: "loss" (gradients of the training loss) or "logits" (the authors' variant).
        split: with mode "loss", also the gradients of the source and target loss terms.
        path: CSV file.
    """

    def __init__(self, every_n_steps: int | None = 50, mode: str = "loss", split: bool = False,
                 path: str | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"Expected mode in {MODES}, got {mode!r}")
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"Expected every_n_steps >= 1 or None, got {every_n_steps}")
        if split and mode != "loss":
            raise ValueError("split=True separates loss terms; it needs mode='loss'")
        self.every_n_steps, self.mode, self.split = every_n_steps, mode, split
        self.path = Path(path) if path is not None else None
        self._measuring = False
        self._term_grads: dict[str, list[Tensor | None]] = {}

    # ---- when ----
    def _due(self, trainer: L.Trainer, batch_idx: int) -> bool:
        step = trainer.global_step
        return batch_idx == 0 or (self.every_n_steps is not None and step % self.every_n_steps == 0)

    @staticmethod
    def _named_parameters(pl_module: L.LightningModule) -> list[tuple[str, Tensor]]:
        model = getattr(pl_module, "model", pl_module)
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    # ---- hooks ----
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._measuring = self._due(trainer, batch_idx)
        if self._measuring and self.mode == "logits":
            self._record(trainer, self._logit_variances(pl_module, batch))

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if not (self._measuring and self.mode == "loss" and self.split):
            return
        terms = getattr(pl_module, "loss_terms", None)
        if not terms:
            raise RuntimeError(f"GradientVariance(split=True) needs {type(pl_module).__name__} to set "
                               "`self.loss_terms = {name: loss term}` in training_step")
        params = [p for _, p in self._named_parameters(pl_module)]
        self._term_grads = {kind: list(torch.autograd.grad(term, params, retain_graph=True, allow_unused=True))
                            for kind, term in terms.items()}

    def on_after_backward(self, trainer, pl_module) -> None:
        if not (self._measuring and self.mode == "loss"):
            return
        named = self._named_parameters(pl_module)
        rows = [(name, "total", p.grad) for name, p in named]
        for kind, grads in self._term_grads.items():
            rows += [(name, kind, g if g is not None else torch.zeros_like(p)) for (name, p), g in zip(named, grads)]
        self._term_grads = {}
        self._record(trainer, [(name, kind, gradient_variance(g)) for name, kind, g in rows if g is not None])

    # ---- the authors' variant ----
    def _logit_variances(self, pl_module, batch) -> list[tuple[str, str, float]]:
        (source, _), target = batch["source"], batch.get("target")  # no target in plain classification
        domains = [("logits_source", source, SOURCE)] + ([("logits_target", target, TARGET)] if target is not None else [])
        named = self._named_parameters(pl_module)
        model = pl_module.model
        devices = [source.device] if source.device.type == "cuda" else []
        rows = []
        with torch.random.fork_rng(devices=devices), frozen_stats(model):
            for kind, images, domain in domains:
                inputs = pl_module.weak_views(images)
                context = torch.full((len(inputs),), domain, device=inputs.device)
                with torch.enable_grad():
                    logits = model(inputs, context)
                    grads = torch.autograd.grad(logits.sum(), [p for _, p in named], allow_unused=True)
                rows += [(name, kind, gradient_variance(g)) for (name, _), g in zip(named, grads) if g is not None]
        return rows

    # ---- output ----
    def _csv_path(self, trainer: L.Trainer) -> Path:
        if self.path is not None:
            return self.path
        return log_directory(trainer) / "gradient_variance.csv"

    def _record(self, trainer: L.Trainer, rows: Iterable[tuple[str, str, float]]) -> None:
        rows = list(rows)
        if not rows or not trainer.is_global_zero:
            return
        step, epoch = trainer.global_step, trainer.current_epoch
        path = self._csv_path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with path.open("a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(COLUMNS)
            writer.writerows((step, epoch, *split_name(name), kind, f"{v:.9g}") for name, kind, v in rows)
        metrics = {}
        for kind in dict.fromkeys(k for _, k, _ in rows):
            values = [v for _, k, v in rows if k == kind]
            metrics[f"grad_var/{kind}/max"] = max(values)
            metrics[f"grad_var/{kind}/mean"] = sum(values) / len(values)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
