"""What callers may ask of any norm layer: context-awareness, running-statistics control, mixture parameters."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

# Context ids when the domain is the context (docs/METHOD.md §4): source = 0, target = 1.
SOURCE, TARGET = 0, 1


def uses_context(module: nn.Module) -> bool:
    """Whether ``module.forward`` takes a per-sample context id (decided at construction)."""
    return bool(getattr(module, "uses_context", False))


def mixture_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learned mixtures' parameters of ``model`` (each layer's ``mixture_parameters()``: UAN's λ, μ, σ²)."""
    return [p for module in model.modules() for p in getattr(module, "mixture_parameters", list)()]


@contextmanager
def frozen_stats(model: nn.Module) -> Iterator[None]:
    """Run forward passes whose running-statistics updates are discarded.

    Every buffer of ``model`` (BatchNorm running mean/var and counters, MN's EM and running
    estimates, UAN's running α/δ²) is snapshotted on entry and restored on exit. The restore
    swaps the snapshot in rather than copying into the old tensor, so a graph built inside
    the block, which may have saved those buffers, can still be backpropagated
    (AdaMatch's source-only pass, docs/METHOD.md §5 step 1). Parameters that a layer's
    forward writes like statistics (``module.written_parameters()``, e.g. UAN's momentum fit)
    are restored too, by copying the values back.
    """
    saved = [(module, name, buf.clone()) for module in model.modules()
             for name, buf in module._buffers.items() if buf is not None]
    written = [(p, p.detach().clone()) for module in model.modules()
               for p in getattr(module, "written_parameters", list)()]
    try:
        yield
    finally:
        for module, name, buf in saved:
            module._buffers[name] = buf
        with torch.no_grad():
            for parameter, value in written:
                parameter.copy_(value)
