"""docs/METHOD.md §2 written literally with autograd: the reference the fused passes are tested against."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def responsibilities(x: Tensor, log_weight: Tensor, mean: Tensor, var: Tensor, context: Tensor | None) -> Tensor:
    """τ (N, K, C, P) from a mixture; x (N, C, P), log_weight (G, K, C), mean/var (K, C)."""
    lw = log_weight[context] if context is not None else log_weight[0].expand(x.shape[0], -1, -1)
    log_p = (lw.unsqueeze(-1) - 0.5 * torch.log(2 * math.pi * var).unsqueeze(-1)
             - (x.unsqueeze(1) - mean.unsqueeze(-1)) ** 2 / (2 * var.unsqueeze(-1)))
    return torch.softmax(log_p, dim=1)


def transform(x: Tensor, log_weight: Tensor, mean: Tensor, var: Tensor, gamma: Tensor, beta: Tensor,
              eps: float, context: Tensor | None = None, stats: tuple[Tensor, Tensor] | None = None,
              delta2_floor: Tensor | None = None) -> Tensor:
    """y = γ Σ_k τ_k/sqrt(λ_k) (x − α_k)/sqrt(max(δ_k², floor_c) + ε) + β with batch (or given) α, δ²; x (N, C, *)."""
    shape = x.shape
    x = x.reshape(shape[0], shape[1], -1)
    tau = responsibilities(x, log_weight, mean, var, context)
    if stats is None:
        mass = tau.sum((0, 3))
        alpha = (tau * x.unsqueeze(1)).sum((0, 3)) / mass
        delta2 = (tau * (x.unsqueeze(1) - alpha.unsqueeze(-1)) ** 2).sum((0, 3)) / mass
    else:
        alpha, delta2 = stats
    if delta2_floor is not None:
        delta2 = torch.maximum(delta2, delta2_floor)
    lw = log_weight[context] if context is not None else log_weight[0].expand(x.shape[0], -1, -1)
    lam = lw.exp().unsqueeze(-1)
    parts = tau / lam.sqrt() * (x.unsqueeze(1) - alpha.unsqueeze(-1)) / (delta2.unsqueeze(-1) + eps).sqrt()
    y = gamma.view(1, -1, 1) * parts.sum(1) + beta.view(1, -1, 1)
    return y.reshape(shape)
