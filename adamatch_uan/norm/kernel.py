"""The mixture transform's autograd node: compiled (a C++ node over a CPU kernel) or torch ops.

:func:`transform` takes ``x`` of shape (N, C, P) and the per-channel 1-D Gaussian mixture
of :class:`Tables` (means ``mu`` (K, C), weights λ (G, K, C), variances σ² (K, C)), where
sample n uses the weights of its group ``ctx[n]`` (group 0 when ``ctx`` is None). λ and σ²
are given either directly or as UAN's parameters (``floors`` set):
``λ = w + (1 - K w) softmax_k(prior_logits)``, ``σ² = softplus(raw_var) + min_var``
(:func:`parametrise`), and the backward returns the gradients of those parameters.
With ``h = 1 / (2 σ²)`` and ``lc = log λ - ½ log(2π σ²)``, the responsibilities are
``tau_k = softmax_k(lc_k - h_k (x - mu_k)^2)``. The formulas are in ``mixture.py``.

- Forward: the tables; the shift s (C,) = each channel's first value and the sums
  S (3, K, C) over positions of tau_k * {1, x - s, (x - s)^2}; α, δ² from them (or given);
  A = γ λ^(-1/2) (δ² + ε)^(-1/2); y = β + Σ_k tau_k A[g, k] (x - α_k); and, if asked, the
  running averages of α and δ² updated in place.
- Backward: the output pass (the input gradient's direct part and reductions
  E0, E1, L0, R1, R2), the gradient of S, the stats pass's part of the input gradient, and
  every parameter gradient.

Between the sums and the output (and between the two backward passes) a distributed
version would all-reduce S (and the reductions); the kernel keeps those passes apart inside
its calls. The compiled kernel (``mixture_kernel.cpp``) recomputes tau in registers in each
pass, so a pass reads x once, except that inputs whose tau fits in ``TAU_CACHE_BYTES`` keep
the forward's first tau for the other three passes; it does the (K, C)-sized maths between
passes itself. Its node (``mixture_node.cpp``) is a C++ autograd Function, so a layer costs
one call from Python forward and one backward. The passes work on blocks of one vector
register: positions of a (sample, channel) row when P > 1, channels of a sample for
(N, C, 1) inputs. Both files are built on first use (``build.py``, or ahead of time with
``python -m adamatch_uan.norm.build``). The node serves contiguous CPU float32/float64
inputs with K <= 8. Everything else, and every input when the environment sets
``ADAMATCH_UAN_KERNEL=0`` or the build fails (with a loud warning), runs on the torch-ops
backend below, which materialises (N, K, C, P) tensors (``backend`` says which a call gets).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from adamatch_uan.norm import build

# Up to this size the forward keeps the responsibilities (K x the input) for the later
# passes, which then skip their exponentials; beyond it they recompute them, as reading a
# cache that falls out of the CPU caches would cost more than the exponentials.
TAU_CACHE_BYTES = 4 << 20


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


@functools.cache
def _extension():
    """The compiled node (``mixture_node.cpp`` with the kernel), built once per process by
    ``build.load`` (or None: ``ADAMATCH_UAN_KERNEL=0``, or a failed build, with a loud warning)."""
    return build.load()


def kernel_available() -> bool:
    """Whether the compiled CPU kernel can be used in this process."""
    return _extension() is not None


def backend(device: torch.device | str, num_components: int) -> str:
    """Which backend a mixture layer with K components on ``device`` runs (float32/64 inputs): a short phrase."""
    if torch.device(device).type != "cpu":
        return "torch ops (no compiled kernel for GPUs)"
    if num_components > 8:
        return "torch ops (K > 8)"
    if _extension() is None:
        return "torch ops (the compiled kernel is off or failed to build: see the warning)"
    return "the compiled CPU kernel"


def _uses_kernel(x: Tensor, mu: Tensor) -> bool:
    # K <= kMaxK of mixture_kernel.h.
    return (x.is_cpu and x.dtype in (torch.float32, torch.float64) and x.is_contiguous() and mu.shape[0] <= 8
            and _extension() is not None)


def transform(x: Tensor, context: Tensor | None, eps: float, floors: tuple[float, float] | None,
              running: Running | None, want_stats: bool, weight_param: Tensor, mu: Tensor, var_param: Tensor,
              gamma: Tensor, beta: Tensor, alpha: Tensor | None, delta2: Tensor | None,
              delta2_floor: Tensor | None = None) -> tuple[Tensor, ...]:
    """The transform of ``x`` (N, C, P) as one autograd node, on the compiled kernel's node
    (``mixture_node.cpp``) when it serves the input, else on torch ops.

    The tables are those of :class:`Tables`, each contiguous in the dtype of x. α, δ² (K, C)
    given, or None for batch statistics; ``delta2_floor`` (C,), a constant, or None: the
    transform normalizes by max(δ², floor) + ε. With batch statistics ``running`` averages
    (of the unfloored α, δ²) are updated in place
    (r ← r + momentum (batch − r), δ² corrected by S0 / max(S0 − 1, 1), BatchNorm's
    n / (n − 1) at K = 1). Returns (y,), or with batch statistics and ``want_stats``
    (y, S0, α, δ²), the last three (K, C) and not differentiable.
    """
    if _uses_kernel(x, mu):
        w, v = floors or (0.0, 0.0)
        mean, var, momentum = running or (None, None, 0.0)
        return _extension().transform(x, context, weight_param, mu, var_param, gamma, beta, alpha, delta2,
                                      delta2_floor, mean, var, eps, w, v, momentum, floors is not None, want_stats,
                                      TAU_CACHE_BYTES)
    return _TorchTransform.apply(x, context, eps, floors, running, want_stats, weight_param, mu, var_param, gamma,
                                 beta, alpha, delta2, delta2_floor)


def sums(x: Tensor, context: Tensor | None, floors: tuple[float, float] | None, weight_param: Tensor, mu: Tensor,
         var_param: Tensor) -> tuple[Tensor, Tensor]:
    """The transform's sums alone, differentiable: S (3, K, C) = Σ_pos τ_k {1, x − s, (x − s)²} about
    each channel's first value s (C,; 0 for an empty batch), the tables as in ``transform``.

    A distributed run all-reduces S between this call and ``transform`` with the statistics it
    gives; the backward of S is the stats pass's (the compiled node's, or autograd's on torch ops).
    """
    if _uses_kernel(x, mu):
        w, v = floors or (0.0, 0.0)
        return tuple(_extension().sums(x, context, weight_param, mu, var_param, w, v, floors is not None))
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


# ---- torch-ops backend: the same passes, materialising (N, K, C, P) tensors ----

class _TorchTransform(Function):
    """The torch-ops backend's node: ``_forward_torch``, then ``_backward_torch``."""

    @staticmethod
    def forward(ctx, x, context, eps, floors, running, want_stats, weight_param, mu, var_param, gamma, beta, alpha,
                delta2, delta2_floor):
        tables = Tables(context, mu, weight_param, var_param, gamma, beta, eps, floors, delta2_floor)
        given = None if alpha is None else (alpha, delta2)
        y, stats = _forward_torch(x, tables, given)
        if given is None and running is not None:
            _track(stats, running)
        ctx.save_for_backward(x)
        ctx.tables, ctx.stats = tables, stats
        if given is not None or not want_stats:
            return (y,)
        batch = (stats.sums[0], stats.alpha, stats.delta2)
        ctx.mark_non_differentiable(*batch)
        return (y, *batch)

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, *unused):
        (x,) = ctx.saved_tensors
        need = ctx.needs_input_grad[6:]
        dx, grads = _backward_torch(gy.contiguous(), x, ctx.tables, ctx.stats, need_param_grads=any(need[:3]))
        return (dx, None, None, None, None, None, *(grad if needed else None for grad, needed in zip(grads, need)),
                None)


@torch.no_grad()
def _track(stats: Stats, running: Running) -> None:
    """r ← r + momentum (batch − r), with δ² corrected by S0 / max(S0 − 1, 1) (BatchNorm's n / (n − 1) at K = 1)."""
    mean, var, momentum = running
    count = stats.sums[0]
    mean.lerp_(stats.alpha.to(mean.dtype), momentum)
    var.lerp_((stats.delta2 * count / (count - 1).clamp_min(1)).to(var.dtype), momentum)


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


def _floored(delta2: Tensor, t: Tables) -> Tensor:
    return delta2 if t.delta2_floor is None else torch.maximum(delta2, t.delta2_floor)


def _safe_moments(sums: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """S0 floored at sqrt(tiny) (an empty component gets α = s, δ² = 0), S1/S0, S2/S0."""
    safe = sums[0].clamp_min(torch.finfo(sums.dtype).tiny ** 0.5)
    return safe, sums[1] / safe, sums[2] / safe


def _forward_torch(x: Tensor, t: Tables, given: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Stats]:
    if t.floors:
        _, log_weight, var = parametrise(t.weight_param, t.var_param, *t.floors)
    else:
        log_weight, var = t.weight_param, t.var_param
    stats = Stats(log_weight, var, 0.5 / var, log_weight - 0.5 * torch.log(2 * math.pi * var), *[None] * 5)
    tau, _ = _responsibilities(x, t, stats)
    if given is None:
        shift = x[0, :, 0].clone()
        xt = (x - shift.view(1, -1, 1)).unsqueeze(1)
        sums = torch.stack([tau.sum((0, 3)), (tau * xt).sum((0, 3)), (tau * xt * xt).sum((0, 3))])
        _, m1, m2 = _safe_moments(sums)
        alpha, delta2 = shift + m1, (m2 - m1 * m1).clamp_min(0)
    else:
        shift, sums = None, None
        alpha, delta2 = given
    A = t.gamma * torch.exp(-0.5 * log_weight) * torch.rsqrt(_floored(delta2, t) + t.eps)
    y = t.beta.view(1, -1, 1) + (tau * _per_sample(A, t, x.shape[0]) * (x.unsqueeze(1) - alpha.unsqueeze(-1))).sum(1)
    return y, stats._replace(shift=shift, sums=sums, alpha=alpha, delta2=delta2, A=A)


def _backward_torch(gy: Tensor, x: Tensor, t: Tables, s: Stats, need_param_grads: bool) -> tuple[Tensor, Grads]:
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
    g_alpha = -(s.A * E0).sum(0)
    g_delta2 = -0.5 * (E1 * s.A).sum(0) / (s.delta2 + t.eps)
    if t.delta2_floor is not None:  # through max(δ², floor): none where the floor holds
        g_delta2 = torch.where(s.delta2 < t.delta2_floor, 0.0, g_delta2)
    g_h, g_lc, g_mu = -R2.sum(0), L0, R1.sum(0)
    if s.sums is not None:  # the stats pass, through α, δ² to the sums
        count = s.sums[0]
        safe, m1, m2 = _safe_moments(s.sums)
        g_raw = g_delta2 * (m2 - m1 * m1 >= 0)
        g_S0 = -(g_alpha * m1 + g_raw * (m2 - 2 * m1 * m1)) / safe * (count >= safe)
        d0, d1, d2 = (g.unsqueeze(-1) for g in (g_S0, (g_alpha - 2 * m1 * g_raw) / safe, g_raw / safe))
        xt = (x - s.shift.view(1, -1, 1)).unsqueeze(1)
        e = d0 + (d1 + d2 * xt) * xt
        dl = tau * (e - (tau * e).sum(1, keepdim=True))
        dx += (tau * (d1 + 2 * d2 * xt)).sum(1) - 2 * (dl * s.h.unsqueeze(-1) * d).sum(1)
        L0s, R1s, R2s = _logit_reductions(dl, d, t)
        g_h, g_lc, g_mu = g_h - R2s.sum(0), g_lc + L0s, g_mu + R1s.sum(0)
    rstd = torch.rsqrt(_floored(s.delta2, t) + t.eps)
    g_log_weight = g_lc - 0.5 * E1 * s.A
    g_var = -0.5 * (g_h / s.var + g_lc.sum(0)) / s.var
    if t.floors:
        with torch.enable_grad():
            params = [t.weight_param.detach().requires_grad_(), t.var_param.detach().requires_grad_()]
            _, log_weight, var = parametrise(*params, *t.floors)
            g_log_weight, g_var = torch.autograd.grad((log_weight, var), params, (g_log_weight, g_var))
    return dx, Grads(weight_param=g_log_weight, mu=2 * s.h * g_mu, var_param=g_var,
                     gamma=(E1 * torch.exp(-0.5 * s.log_weight) * rstd).sum((0, 1)), beta=E0.sum((0, 1)),
                     alpha=g_alpha, delta2=g_delta2)
