"""Activation histograms of a norm layer's input with the layer's own mixture drawn over them."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from adamatch_uan.callbacks.log_directory import log_directory
from adamatch_uan.norm import SOURCE, TARGET, frozen_stats, local_statistics
from adamatch_uan.plots import activation_figure, layer_mixture, norm_layers


class ActivationPlot(L.Callback):
    """Every ``every_n_epochs`` epochs (and every ``every_n_steps`` steps if set), plot one batch's
    input to a norm layer of ``pl_module.model``.

    The batch is the latest training batch: weak views of its source and target images (source
    only when the batch has no target, as in plain classification), one
    training-mode forward pass under ``frozen_stats`` and ``fork_rng`` (the model, its
    running statistics and the training RNG stream are left as they were). The histogram
    (per ``channel``, or pooled over channels) is drawn per domain, with the layer's mixture
    over it: UAN's learned λ, μ, σ²; MN's EM estimates; BatchNorm's running mean and variance
    as one Gaussian. The PNG goes to ``<trainer.log_dir>/activations/<layer>-step<step>.png``
    and, when a TensorBoard logger is active, to TensorBoard as ``activations/<layer>``.

    Args:
        layer: module name inside ``pl_module.model`` (e.g. "norms.0.layer"); None: the first
            norm layer with more than 3 channels (the first hidden layer, not the input).
        every_n_epochs: plot at the end of every n-th epoch (None: never at epoch ends).
        every_n_steps: also plot every n global steps (None: never).
        channel: channel to plot; None pools all channels.
    """

    def __init__(self, layer: str | None = None, every_n_epochs: int | None = 1, every_n_steps: int | None = None,
                 channel: int | None = None) -> None:
        for name, value in (("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps)):
            if value is not None and value < 1:
                raise ValueError(f"Expected {name} >= 1 or None, got {value}")
        self.layer, self.channel = layer, channel
        self.every_n_epochs, self.every_n_steps = every_n_epochs, every_n_steps
        self._batch = None
        self.written: list[Path] = []

    def resolve_layer(self, model: torch.nn.Module) -> tuple[str, torch.nn.Module]:
        layers = norm_layers(model)
        if self.layer is not None:
            if self.layer not in layers:
                raise ValueError(f"Expected ActivationPlot layer in {list(layers)}, got {self.layer!r}")
            return self.layer, layers[self.layer]
        hidden = [(n, m) for n, m in layers.items() if getattr(m, "num_features", 0) > 3]
        if not hidden:
            raise ValueError(f"ActivationPlot found no norm layer with more than 3 channels in {list(layers)}; "
                             "the model has no mixture to draw (norm 'none'?)")
        return hidden[0]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._batch = batch
        if self.every_n_steps is not None and trainer.global_step % self.every_n_steps == 0:
            self.plot(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.every_n_epochs is not None and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.plot(trainer, pl_module)

    @torch.no_grad()
    def plot(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path | None:
        if self._batch is None or not trainer.is_global_zero:
            return None
        model = pl_module.model
        name, layer = self.resolve_layer(model)
        (source, _), target = self._batch["source"], self._batch.get("target")  # no target in plain classification
        domains = [("source", source, SOURCE)] + ([("target", target, TARGET)] if target is not None else [])
        captured = []
        hook = layer.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0].detach()))
        devices = [source.device] if source.device.type == "cuda" else []
        try:
            # Only the first process plots: its pass must not wait on the others' statistics.
            with torch.random.fork_rng(devices=devices), frozen_stats(model), local_statistics(model):
                for _, images, domain in domains:
                    inputs = pl_module.weak_views(images)
                    model(inputs, torch.full((len(inputs),), domain, device=inputs.device))
        finally:
            hook.remove()
        samples = {label: x.float().transpose(0, 1).reshape(x.shape[1], -1).T.cpu().numpy()
                   for (label, _, _), x in zip(domains, captured)}
        step = trainer.global_step
        figure = activation_figure(samples, layer_mixture(layer), self.channel,
                                   title=f"{name} ({type(layer).__name__}), step {step}")
        path = log_directory(trainer) / "activations" / f"{name}-step{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=80)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure(f"activations/{name}", figure, global_step=step, close=False)
        self.written.append(path)
        return path
