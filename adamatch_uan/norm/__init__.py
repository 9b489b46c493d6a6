"""Normalization layers every backbone can plug in: BatchNorm, per-domain BatchNorm, GroupNorm, Mixture
Normalization, UAN.

``make_norm(norm, num_features, **options)`` resolves a name from ``NORMS`` or calls a
callable; backbones call it once per layer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import nn

from adamatch_uan.norm.batch import BatchNorm
from adamatch_uan.norm.context import (SOURCE, TARGET, frozen_stats, local_statistics, mixture_parameters, sync_norms,
                                       unsync_norms, uses_context)
from adamatch_uan.norm.convert import WithContext, convert_norms
from adamatch_uan.norm.domain_batch import DomainBatchNorm, group_norm
from adamatch_uan.norm.mixture import BatchStats, Mixture, mixture_normalize
from adamatch_uan.norm.mn import MixtureNorm
from adamatch_uan.norm.recalibrate import recalibrated
from adamatch_uan.norm.uan import UAN


def _identity(num_features: int, **options) -> nn.Module:
    return nn.Identity()


# Returns an nn.Module; annotated Any because jsonargparse would list every nn.Module subclass
# in importable code as a choice in `--model.help`.
NormFactory = Callable[..., Any]

NORMS: dict[str, NormFactory] = {
    "bn": BatchNorm,
    # BatchNorm statistics per domain (DSBN), the K = 1 counterpart of uan_ctx: source = 0, target = 1.
    "bn_ctx": functools.partial(DomainBatchNorm, num_contexts=2),
    "gn": group_norm,
    "mn": MixtureNorm,
    "uan": UAN,
    # UAN with the domain as context: source = 0, target = 1 (docs/METHOD.md §4).
    "uan_ctx": functools.partial(UAN, num_contexts=2),
    # The paper's literal reading: the task gradient alone fits the mixture, no variance floor,
    # evaluation with the learned μ, σ² (docs/RESULTS.md: it evaluates a mixture that describes nothing).
    "uan_paper": functools.partial(UAN, mixture_fit="gradient", var_floor=0.0, inference="learned"),
    "none": _identity,
}


def list_norms() -> list[str]:
    """The registered norm names."""
    return sorted(NORMS)


def make_norm(norm: str | NormFactory, num_features: int, **options) -> nn.Module:
    """Build a normalization layer.

    Args:
        norm: a name in ``NORMS`` or a callable ``(num_features, **options) -> nn.Module``.
        num_features: channels C.
        **options: passed to the layer's constructor.

    Raises:
        ValueError: for an unknown name, listing the choices.
    """
    if callable(norm):
        return norm(num_features, **options)
    if isinstance(norm, str) and norm in NORMS:
        return NORMS[norm](num_features, **options)
    raise ValueError(f"Expected a norm name in {{{', '.join(list_norms())}}} or a callable "
                     f"(num_features, **options) -> nn.Module, got {norm!r}; use --norm NAME")


__all__ = ["NORMS", "SOURCE", "TARGET", "BatchNorm", "BatchStats", "DomainBatchNorm", "Mixture", "MixtureNorm",
           "NormFactory", "UAN", "WithContext", "convert_norms", "frozen_stats", "group_norm", "list_norms",
           "local_statistics", "make_norm", "mixture_normalize", "mixture_parameters", "recalibrated", "sync_norms",
           "unsync_norms", "uses_context"]
