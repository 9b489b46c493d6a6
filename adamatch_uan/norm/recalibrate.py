"""AdaBN (Li et al., 2016): a model's running statistics re-estimated on another domain's images.

``recalibrated(model, batches, context)`` returns a copy of ``model`` whose norm layers' running
statistics are those of the given (unlabelled) images: training-mode forward passes without
gradients, with every layer's ``momentum`` set to 1/(t + 1) at batch t, so each running average
ends as the plain mean over the batches (what BatchNorm's ``momentum=None`` computes). It serves
every norm: BatchNorm's mean and variance, UAN's running α, δ² (what its running rule evaluates
with) and channel variance, MN's running mixture and α, δ², per-domain BatchNorm's statistics of
the context the images are given. Parameters are restored after the passes (UAN's momentum fit
writes its mixture in a training forward), so only running statistics change; the model given
is not touched.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import Tensor, nn


@torch.no_grad()
def recalibrated(model: nn.Module, batches: Iterable[Tensor], context: int | None = None) -> nn.Module:
    """A copy of ``model`` in eval mode with its running statistics taken over ``batches`` (model inputs,
    each (N, ...)), given the context id ``context`` (context-aware layers) or none."""
    copy_ = copy.deepcopy(model)
    layers = [m for m in copy_.modules() if hasattr(m, "momentum")
              and any(name.startswith("running") for name, _ in m.named_buffers(recurse=False))]
    parameters = {name: p.detach().clone() for name, p in copy_.named_parameters()}
    momenta = [m.momentum for m in layers]
    copy_.train()
    try:
        for t, images in enumerate(batches):
            for m in layers:
                m.momentum = 1.0 / (t + 1)
            ids = None if context is None else torch.full((len(images),), context, dtype=torch.long, device=images.device)
            copy_(images, ids) if ids is not None else copy_(images)
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        for name, p in copy_.named_parameters():
            p.copy_(parameters[name])
    return copy_.eval()
