"""The torch-ops backend of the mixture transform, and the (K, C)-sized maths every backend shares.

The passes over x materialise (N, K, C, P) tensors here (the compiled CPU kernel and the Triton
kernels stream instead); the small per-channel maths between the passes (the tables from UAN's
parameters, α and δ² from the sums, the output scales A, the gradients through them) is written
once, in the functions below the classes, and the Triton backend (``triton_ops.py``) calls the
same functions between its kernels. The formulas are in ``mixture.py`` and ``kernel.py``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function
from torch.autograd.function import once_differentiable


class Tables(NamedTuple):
    """What the transform reads besides x, each contiguous in the compute dtype: groups ``ctx``
    (N,) or None; ``mu`` (K, C); ``weight_param`` (G, K, C) and ``var_param`` (K, C), which
    are log λ and σ² when ``floors`` is None, and UAN's prior logits and softplus
    pre-activation when ``floors = (min_weight, min_var)``; γ, β (C,); ε; and the floor
    (C,) of δ² or None (the transform normalizes by max(δ_k², floor_c) + ε)."""

    ctx: Tensor | None
    mu: Tensor
    weight_param: Tensor
    var_param: Tensor
    gamma: Tensor
    beta: Tensor
    eps: float
    floors: tuple[float, float] | None = None
    delta2_floor: Tensor | None = None


class Stats(NamedTuple):
    """What the torch-ops forward computed and its backward reuses: log λ (G, K, C), σ², h
    (K, C), lc (G, K, C), the shift (C,) and sums (3, K, C) (None with given statistics), α
    and δ² (K, C), and the output scales A (G, K, C)."""

    log_weight: Tensor
    var: Tensor
    h: Tensor
    lc: Tensor
    shift: Tensor | None
    sums: Tensor | None
    alpha: Tensor
    delta2: Tensor
    A: Tensor


class Grads(NamedTuple):
    """Gradients of the loss w.r.t. the tables' ``weight_param`` (G, K, C), ``mu``,
    ``var_param`` (K, C), γ, β (C,) and given α, δ² (K, C)."""

    weight_param: Tensor
    mu: Tensor
    var_param: Tensor
    gamma: Tensor
    beta: Tensor
    alpha: Tensor
    delta2: Tensor


Running = tuple[Tensor, Tensor, float]
"""Running averages of α and δ² (K, C) and their momentum."""


def parametrise(prior_logits: Tensor, raw_var: Tensor, min_weight: float, min_var: float) -> tuple[Tensor, Tensor, Tensor]:
    """UAN's parametrisation with torch ops: λ = w + (1 − K w) softmax_k(prior_logits) over
    dim 1, its log (log_softmax when w = 0, so no weight underflows to log 0), and
    σ² = softplus(raw_var) + min_var."""
    K = prior_logits.shape[1]
    weights = min_weight + (1 - K * min_weight) * torch.softmax(prior_logits, dim=1)
    log_weight = torch.log_softmax(prior_logits, dim=1) if min_weight == 0 else torch.log(weights)
    return weights, log_weight, F.softplus(raw_var) + min_var


# ---- the (K, C) maths between the passes, shared by the backends ----

def tables(t: Tables) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """log λ (G, K, C), σ² (K, C), h = 1/(2σ²) and lc = log λ − ½ log(2πσ²) (G, K, C) from the tables."""
    if t.floors:
        _, log_weight, var = parametrise(t.weight_param, t.var_param, *t.floors)
    else:
        log_weight, var = t.weight_param, t.var_param
    return log_weight, var, 0.5 / var, log_weight - 0.5 * torch.log(2 * math.pi * var)


def moments(sums: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
    """α = s + S1/S0 and δ² = max(S2/S0 − (S1/S0)², 0) from the sums about the shift s."""
    _, m1, m2 = _safe_moments(sums)
    return shift + m1, (m2 - m1 * m1).clamp_min(0)


def scales(t: Tables, log_weight: Tensor, delta2: Tensor) -> Tensor:
    """A = γ λ^(−½) (max(δ², floor) + ε)^(−½), (G, K, C)."""
    return t.gamma * torch.exp(-0.5 * log_weight) * torch.rsqrt(_floored(delta2, t) + t.eps)


def statistic_grads(E0: Tensor, E1: Tensor, t: Tables, s: Stats) -> tuple[Tensor, Tensor]:
    """∂L/∂α = −Σ_g A E0 and ∂L/∂δ² = −½ Σ_g E1 A / (δ² + ε) (none where the floor holds)."""
    g_alpha = -(s.A * E0).sum(0)
    g_delta2 = -0.5 * (E1 * s.A).sum(0) / (s.delta2 + t.eps)
    if t.delta2_floor is not None:  # through max(δ², floor): none where the floor holds
        g_delta2 = torch.where(s.delta2 < t.delta2_floor, 0.0, g_delta2)
    return g_alpha, g_delta2


def sum_grads(g_alpha: Tensor, g_delta2: Tensor, sums: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """∂L/∂(S0, S1, S2) through α and δ² (K, C), each the coefficient of {1, x − s, (x − s)²}
    per position that the stats pass multiplies by τ."""
    count = sums[0]
    safe, m1, m2 = _safe_moments(sums)
    g_raw = g_delta2 * (m2 - m1 * m1 >= 0)
    g_S0 = -(g_alpha * m1 + g_raw * (m2 - 2 * m1 * m1)) / safe * (count >= safe)
    return g_S0, (g_alpha - 2 * m1 * g_raw) / safe, g_raw / safe


def mixture_grads(t: Tables, var: Tensor, h: Tensor, g_h: Tensor, g_mu: Tensor, g_lc: Tensor,
                  g_log_weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The mixture tables' gradients (weight_param, mu, var_param) from those of h, μ (R1's), lc and
    the direct one of log λ: through h = 1/(2σ²), lc = log λ − ½ log(2πσ²) and, for UAN's
    parametrisation, on to its parameters."""
    g_var = -0.5 * (g_h / var + g_lc.sum(0)) / var
    if t.floors:
        with torch.enable_grad():
            params = [t.weight_param.detach().requires_grad_(), t.var_param.detach().requires_grad_()]
            _, log_weight, var_ = parametrise(*params, *t.floors)
            g_log_weight, g_var = torch.autograd.grad((log_weight, var_), params, (g_log_weight, g_var))
    return g_log_weight, 2 * h * g_mu, g_var


def parameter_grads(t: Tables, s: Stats, E0: Tensor, E1: Tensor, g_h: Tensor, g_lc: Tensor, g_mu: Tensor,
                    g_alpha: Tensor, g_delta2: Tensor) -> Grads:
    """Every table's gradient from the reductions (``mixture_grads``, with log λ's direct part
    −½ E1 A through A); γ, β from E1, E0."""
    rstd = torch.rsqrt(_floored(s.delta2, t) + t.eps)
    g_weight, g_mu, g_var = mixture_grads(t, s.var, s.h, g_h, g_mu, g_lc, g_lc - 0.5 * E1 * s.A)
    return Grads(weight_param=g_weight, mu=g_mu, var_param=g_var,
                 gamma=(E1 * torch.exp(-0.5 * s.log_weight) * rstd).sum((0, 1)), beta=E0.sum((0, 1)),
                 alpha=g_alpha, delta2=g_delta2)


@torch.no_grad()
def track(stats: Stats, running: Running) -> None:
    """r ← r + momentum (batch − r), with δ² corrected by S0 / max(S0 − 1, 1) (BatchNorm's n / (n − 1) at K = 1)."""
    mean, var, momentum = running
    count = stats.sums[0]
    mean.lerp_(stats.alpha.to(mean.dtype), momentum)
    var.lerp_((stats.delta2 * count / (count - 1).clamp_min(1)).to(var.dtype), momentum)


def _floored(delta2: Tensor, t: Tables) -> Tensor:
    return delta2 if t.delta2_floor is None else torch.maximum(delta2, t.delta2_floor)


def _safe_moments(sums: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """S0 floored at sqrt(tiny) (an empty component gets α = s, δ² = 0), S1/S0, S2/S0."""
    safe = sums[0].clamp_min(torch.finfo(sums.dtype).tiny ** 0.5)
    return safe, sums[1] / safe, sums[2] / safe


# ---- the torch-ops passes ----

def sums(x: Tensor, context: Tensor | None, floors: tuple[float, float] | None, weight_param: Tensor, mu: Tensor,
         var_param: Tensor) -> tuple[Tensor, Tensor]:
    """``kernel.sums`` on torch ops, differentiable by autograd."""
    if floors:
        _, log_weight, var = parametrise(weight_param, var_param, *floors)
    else:
        log_weight, var = weight_param, var_param
    lc = log_weight - 0.5 * torch.log(2 * math.pi * var)
    table = (lc[context] if context is not None else lc.expand(x.shape[0], -1, -1)).unsqueeze(-1)
    d = x.unsqueeze(1) - mu.unsqueeze(-1)
    tau = torch.softmax(table - (0.5 / var).unsqueeze(-1) * d * d, dim=1)
    shift = x[0, :, 0].detach() if len(x) else x.new_zeros(x.shape[1])
    xt = (x - shift.view(1, -1, 1)).unsqueeze(1)
    return torch.stack([tau.sum((0, 3)), (tau * xt).sum((0, 3)), (tau * xt * xt).sum((0, 3))]), shift


def transform_without_grad(x: Tensor, context: Tensor | None, eps: float, floors: tuple[float, float] | None,
                           running: Running | None, want_stats: bool, weight_param: Tensor, mu: Tensor,
                           var_param: Tensor, gamma: Tensor, beta: Tensor, alpha: Tensor | None,
                           delta2: Tensor | None, delta2_floor: Tensor | None) -> tuple[Tensor, ...]:
    """``TorchTransform``'s forward as plain tensor ops, without an autograd node: what inference runs
    and what tracers and exporters record (``backends.transform``'s arguments and results)."""
    tables_ = Tables(context, mu, weight_param, var_param, gamma, beta, eps, floors, delta2_floor)
    y, stats = _forward_torch(x, tables_, None if alpha is None else (alpha, delta2))
    if stats.sums is None:
        return (y,)
    if running is not None:
        track(stats, running)
    return (y, stats.sums[0], stats.alpha, stats.delta2) if want_stats else (y,)


class TorchTransform(Function):
    """The torch-ops backend's node: ``_forward_torch``, then ``_backward_torch``."""

    @staticmethod
    def forward(ctx, x, context, eps, floors, running, want_stats, weight_param, mu, var_param, gamma, beta, alpha,
                delta2, delta2_floor):
        tables_ = Tables(context, mu, weight_param, var_param, gamma, beta, eps, floors, delta2_floor)
        given = None if alpha is None else (alpha, delta2)
        y, stats = _forward_torch(x, tables_, given)
        return finish_forward(ctx, x, tables_, stats, y, running, want_stats)

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, *unused):
        (x,) = ctx.saved_tensors
        return node_grads(ctx, *_backward_torch(gy.contiguous(), x, ctx.tables, ctx.stats))


def finish_forward(ctx, x: Tensor, t: Tables, s: Stats, y: Tensor, running: Running | None,
                   want_stats: bool) -> tuple[Tensor, ...]:
    """The end of a backend node's forward: with batch statistics update the running averages;
    keep x, the tables and statistics for the backward; return (y,) or (y, S0, α, δ²)."""
    if s.sums is not None and running is not None:
        track(s, running)
    ctx.save_for_backward(x)
    ctx.tables, ctx.stats = t, s
    if s.sums is None or not want_stats:
        return (y,)
    batch = (s.sums[0], s.alpha, s.delta2)
    ctx.mark_non_differentiable(*batch)
    return (y, *batch)


def node_grads(ctx, dx: Tensor, grads: Grads) -> tuple:
    """A backend node's backward result, in ``kernel.transform``'s argument order (tables' gradients
    only where asked)."""
    need = ctx.needs_input_grad[6:]
    return (dx, None, None, None, None, None, *(grad if needed else None for grad, needed in zip(grads, need)), None)


def _responsibilities(x: Tensor, t: Tables, s: Stats) -> tuple[Tensor, Tensor]:
    table = s.lc[t.ctx] if t.ctx is not None else s.lc.expand(x.shape[0], -1, -1)
    d = x.unsqueeze(1) - t.mu.unsqueeze(-1)
    return torch.softmax(table.unsqueeze(-1) - s.h.unsqueeze(-1) * d * d, dim=1), d


def _per_sample(table: Tensor, t: Tables, n: int) -> Tensor:
    """(G, K, C) -> (N, K, C, 1): each sample's row of a per-group table."""
    return (table[t.ctx] if t.ctx is not None else table.expand(n, -1, -1)).unsqueeze(-1)


def _group_sum(per_sample: Tensor, t: Tables) -> Tensor:
    """(N, K, C) -> (G, K, C): sum of each group's samples."""
    if t.ctx is None:
        return per_sample.sum(0, keepdim=True)
    return per_sample.new_zeros(t.weight_param.shape[0], *per_sample.shape[1:]).index_add_(0, t.ctx, per_sample)


def _logit_reductions(dl: Tensor, d: Tensor, t: Tables) -> list[Tensor]:
    return [_group_sum((dl * d**i).sum(-1), t) for i in range(3)]


def _forward_torch(x: Tensor, t: Tables, given: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Stats]:
    log_weight, var, h, lc = tables(t)
    stats = Stats(log_weight, var, h, lc, *[None] * 5)
    tau, _ = _responsibilities(x, t, stats)
    if given is None:
        shift = x[0, :, 0].clone()
        xt = (x - shift.view(1, -1, 1)).unsqueeze(1)
        sums_ = torch.stack([tau.sum((0, 3)), (tau * xt).sum((0, 3)), (tau * xt * xt).sum((0, 3))])
        alpha, delta2 = moments(sums_, shift)
    else:
        shift, sums_ = None, None
        alpha, delta2 = given
    A = scales(t, log_weight, delta2)
    y = t.beta.view(1, -1, 1) + (tau * _per_sample(A, t, x.shape[0]) * (x.unsqueeze(1) - alpha.unsqueeze(-1))).sum(1)
    return y, stats._replace(shift=shift, sums=sums_, alpha=alpha, delta2=delta2, A=A)


def _backward_torch(gy: Tensor, x: Tensor, t: Tables, s: Stats) -> tuple[Tensor, Grads]:
    # The output pass: the input gradient's direct part and the reductions E0 = Σ g τ,
    # E1 = Σ g τ (x − α), L0, R1, R2 = Σ dl (x − μ)^i, dl the gradient of the logits.
    tau, d = _responsibilities(x, t, s)
    scale = _per_sample(s.A, t, x.shape[0])
    centred = x.unsqueeze(1) - s.alpha.unsqueeze(-1)
    u = scale * centred
    gt = gy.unsqueeze(1) * tau
    dl = gt * (u - (tau * u).sum(1, keepdim=True))
    dx = (gt * scale).sum(1) - 2 * (dl * s.h.unsqueeze(-1) * d).sum(1)
    E0, E1 = _group_sum(gt.sum(-1), t), _group_sum((gt * centred).sum(-1), t)
    L0, R1, R2 = _logit_reductions(dl, d, t)
    g_alpha, g_delta2 = statistic_grads(E0, E1, t, s)
    g_h, g_lc, g_mu = -R2.sum(0), L0, R1.sum(0)
    if s.sums is not None:  # the stats pass, through α, δ² to the sums
        d0, d1, d2 = (g.unsqueeze(-1) for g in sum_grads(g_alpha, g_delta2, s.sums))
        xt = (x - s.shift.view(1, -1, 1)).unsqueeze(1)
        e = d0 + (d1 + d2 * xt) * xt
        dl = tau * (e - (tau * e).sum(1, keepdim=True))
        dx += (tau * (d1 + 2 * d2 * xt)).sum(1) - 2 * (dl * s.h.unsqueeze(-1) * d).sum(1)
        L0s, R1s, R2s = _logit_reductions(dl, d, t)
        g_h, g_lc, g_mu = g_h - R2s.sum(0), g_lc + L0s, g_mu + R1s.sum(0)
    return dx, parameter_grads(t, s, E0, E1, g_h, g_lc, g_mu, g_alpha, g_delta2)
