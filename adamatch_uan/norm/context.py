"""Context-awareness and running-statistics control shared by every norm layer."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

# Context ids when the domain is the context (ALGORITHMS.md §4): source = 0, target = 1.
SOURCE, TARGET = 0, 1


def uses_context(module: nn.Module) -> bool:
    """Whether ``module.forward`` takes a per-sample context id (decided at construction)."""
    return bool(getattr(module, "uses_context", False))


@contextmanager
def frozen_stats(model: nn.Module) -> Iterator[None]:
    """Run forward passes whose running-statistics updates are discarded.

    Every buffer of ``model`` (BatchNorm running mean/var and counters, MN's EM and running
    estimates, UAN's running α/δ²) is snapshotted on entry and restored on exit. The restore
    swaps the snapshot in rather than copying into the old tensor, so a graph built inside
    the block, which may have saved those buffers, can still be backpropagated
    (AdaMatch's source-only pass, ALGORITHMS.md §5 step 1).
    """
    saved = [(module, name, buf.clone()) for module in model.modules()
             for name, buf in module._buffers.items() if buf is not None]
    try:
        yield
    finally:
        for module, name, buf in saved:
            module._buffers[name] = buf
