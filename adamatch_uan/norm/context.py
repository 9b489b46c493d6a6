"""What callers may ask of any norm layer: context-awareness, running-statistics control, mixture
parameters, statistics synced across processes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

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


def sync_norms(model: nn.Module, process_group=None) -> nn.Module:
    """Take every norm layer's training statistics over the processes of ``process_group`` (None:
    all), in place: UAN and MN layers sync their sums, sampled quantities and EM (their ``sync_stats``
    flag); BatchNorm layers become ``SyncedBatchNorm`` (same parameters, buffers and keys).
    ``unsync_norms`` undoes it. Lightning's switch for it is ``callbacks.MixtureSync``."""
    from adamatch_uan.norm.batch import SyncedBatchNorm  # the layers import this module's helpers

    for module in model.modules():
        if isinstance(module, _BatchNorm) and not isinstance(module, nn.SyncBatchNorm) \
                and not isinstance(module, SyncedBatchNorm):
            module._unsynced_class, module.__class__ = module.__class__, SyncedBatchNorm
        if hasattr(module, "sync_stats"):
            module.sync_stats, module.process_group = True, process_group
    return model


def unsync_norms(model: nn.Module) -> nn.Module:
    """Undo ``sync_norms``: every layer back to its own process's statistics and class."""
    for module in model.modules():
        if "_unsynced_class" in module.__dict__:
            module.__class__ = module.__dict__.pop("_unsynced_class")
            module.__dict__.pop("sync_stats", None), module.__dict__.pop("process_group", None)
        elif hasattr(module, "sync_stats"):
            module.sync_stats, module.process_group = False, None
    return model


@contextmanager
def local_statistics(model: nn.Module) -> Iterator[None]:
    """Run forward passes with each process's own batch statistics (no collectives), e.g. a pass
    that only one process makes (a figure), which synced layers would wait on forever."""
    synced = [m for m in model.modules() if getattr(m, "sync_stats", False)]
    for module in synced:
        module.sync_stats = False
    try:
        yield
    finally:
        for module in synced:
            module.sync_stats = True
