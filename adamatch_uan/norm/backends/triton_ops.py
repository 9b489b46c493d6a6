"""The Triton backend of the mixture transform: the four passes over x as Triton kernels (CUDA).

The passes are those of the compiled CPU kernel and the torch-ops backend (``backends``), for
x of shape (N, C, P) in float32, K ≤ 8 components and G context tables:

- sums:            S (3, K, C) = Σ_pos τ_k {1, x − s, (x − s)²} about the shift s (C,);
- output:          y = β + Σ_k τ_k A_gk (x − α_k);
- output backward: ∂L/∂x's direct part and E0, E1, L0, R1, R2 (5, G, K, C);
- stats backward:  adds the stats part to ∂L/∂x and returns L0, R1, R2 (3, G, K, C) of ∂L/∂S.

τ is recomputed in registers in every pass (softmax over k of lc_gk − h_k (x − μ_k)², in three
sweeps over k), so each pass reads x (and ∂L/∂y) once. Each channel is split over
``cdiv(N·P, BLOCK)`` programs: grid (C, chunks), every program writes its partial sums to its
own row of a (chunks, ...) buffer and torch adds the rows (a fixed order: deterministic, no
atomics). The (K, C) maths between the passes is ``torch_ops``' own (``tables``, ``moments``,
``scales``, the gradient helpers), so the sums step stays separable and a distributed run
all-reduces between the passes as on the other backends.

Statistics are float32: ``mixture_normalize`` hands every backend float32 x for float16/bfloat16
inputs (reading them as bfloat16 in the kernels would halve the bytes moved: not done). The node
is a ``torch.autograd.Function`` around the launches, like the other backends', not
``torch.library.triton_op``: whether torch.compile traces through it is not verified. Without a
GPU, ``TRITON_INTERPRET=1`` runs the same kernels on CPU tensors (the tests).
"""

from __future__ import annotations

import triton
import triton.language as tl
import torch
from torch import Tensor
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from adamatch_uan.norm.backends.torch_ops import (Running, Stats, Tables, finish_forward, mixture_grads, moments, node_grads,
                                         parameter_grads, scales, statistic_grads, sum_grads, tables)

BLOCK = 1024


@triton.jit
def _load_position(x_ptr, ctx_ptr, c, start, N, C, P, BLOCK: tl.constexpr, HAS_CTX: tl.constexpr):
    """The positions start .. start + BLOCK of channel c: their values, group ids, offsets and mask."""
    i = start + tl.arange(0, BLOCK)
    mask = i < N * P
    n = i // P
    offsets = n * C * P + c * P + (i - n * P)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    if HAS_CTX:
        g = tl.load(ctx_ptr + n, mask=mask, other=0)
    else:
        g = tl.zeros([BLOCK], dtype=tl.int64)
    return x, g, offsets, mask


@triton.jit
def _logit(x, g, lc_ptr, h_ptr, mu_ptr, k, c, C, K: tl.constexpr):
    """lc_gk − h_k (x − μ_k)² per position, and d = x − μ_k."""
    lc = tl.load(lc_ptr + (g * K + k) * C + c)
    h = tl.load(h_ptr + k * C + c)
    d = x - tl.load(mu_ptr + k * C + c)
    return lc - h * d * d, d


@triton.jit
def _normaliser(x, g, lc_ptr, h_ptr, mu_ptr, c, C, K: tl.constexpr):
    """The softmax's max and log of the sum of exponentials over k, per position."""
    m, _ = _logit(x, g, lc_ptr, h_ptr, mu_ptr, 0, c, C, K)
    for k in tl.static_range(1, K):
        logit, _ = _logit(x, g, lc_ptr, h_ptr, mu_ptr, k, c, C, K)
        m = tl.maximum(m, logit)
    total = tl.zeros_like(x)
    for k in tl.static_range(K):
        logit, _ = _logit(x, g, lc_ptr, h_ptr, mu_ptr, k, c, C, K)
        total += tl.exp(logit - m)
    return m, tl.log(total)


@triton.jit
def _sums_kernel(x_ptr, ctx_ptr, lc_ptr, h_ptr, mu_ptr, shift_ptr, out_ptr, N, C, P,
                 K: tl.constexpr, BLOCK: tl.constexpr, HAS_CTX: tl.constexpr):
    c, chunk = tl.program_id(0), tl.program_id(1)
    x, g, _, mask = _load_position(x_ptr, ctx_ptr, c, chunk * BLOCK, N, C, P, BLOCK, HAS_CTX)
    m, log_total = _normaliser(x, g, lc_ptr, h_ptr, mu_ptr, c, C, K)
    xt = x - tl.load(shift_ptr + c)
    row = out_ptr + chunk * 3 * K * C
    for k in tl.static_range(K):
        logit, _ = _logit(x, g, lc_ptr, h_ptr, mu_ptr, k, c, C, K)
        tau = tl.where(mask, tl.exp(logit - m - log_total), 0.0)
        tl.store(row + k * C + c, tl.sum(tau, 0))
        tl.store(row + (K + k) * C + c, tl.sum(tau * xt, 0))
        tl.store(row + (2 * K + k) * C + c, tl.sum(tau * xt * xt, 0))


@triton.jit
def _output_kernel(x_ptr, ctx_ptr, lc_ptr, h_ptr, mu_ptr, a_ptr, alpha_ptr, beta_ptr, y_ptr, N, C, P,
                   K: tl.constexpr, BLOCK: tl.constexpr, HAS_CTX: tl.constexpr):
    c, chunk = tl.program_id(0), tl.program_id(1)
    x, g, offsets, mask = _load_position(x_ptr, ctx_ptr, c, chunk * BLOCK, N, C, P, BLOCK, HAS_CTX)
    m, log_total = _normaliser(x, g, lc_ptr, h_ptr, mu_ptr, c, C, K)
    y = tl.zeros_like(x) + tl.load(beta_ptr + c)
    for k in tl.static_range(K):
        logit, _ = _logit(x, g, lc_ptr, h_ptr, mu_ptr, k, c, C, K)
        tau = tl.exp(logit - m - log_total)
        a = tl.load(a_ptr + (g * K + k) * C + c)
        y += tau * a * (x - tl.load(alpha_ptr + k * C + c))
    tl.store(y_ptr + offsets, y, mask=mask)


@triton.jit
def _group_store(row_ptr, value, g, mask, k, c, C, K: tl.constexpr, G: tl.constexpr, slot: tl.constexpr):
    """Store Σ value per group g into row[slot, g, k, c] of a (slots, G, K, C) partial-sum row."""
    for gi in tl.static_range(G):
        tl.store(row_ptr + ((slot * G + gi) * K + k) * C + c, tl.sum(tl.where(mask & (g == gi), value, 0.0), 0))


@triton.jit
def _output_backward_kernel(x_ptr, gy_ptr, ctx_ptr, lc_ptr, h_ptr, mu_ptr, a_ptr, alpha_ptr, dx_ptr, out_ptr,
                            N, C, P, K: tl.constexpr, G: tl.constexpr, BLOCK: tl.constexpr, HAS_CTX: tl.constexpr):
    c, chunk = tl.program_id(0), tl.program_id(1)
    x, g, offsets, mask = _load_position(x_ptr, ctx_ptr, c, chunk * BLOCK, N, C, P, BLOCK, HAS_CTX)
    gy = tl.load(gy_ptr + offsets, mask=mask, other=0.0)
    m, log_total = _normaliser(x, g, lc_ptr, h_ptr, mu_ptr, c, C, K)
    tau_u = tl.zeros_like(x)  # Σ_k τ_k u_k, u_k = A_gk (x − α_k)
    for k in tl.static_range(K):
        logit, _ = _logit(x, g, lc_ptr, h_ptr, mu_ptr, k, c, C, K)
        a = tl.load(a_ptr + (g * K + k) * C + c)
        tau_u += tl.exp(logit - m - log_total) * a * (x - tl.load(alpha_ptr + k * C + c))
    dx = tl.zeros_like(x)
    row = out_ptr + chunk * 5 * G * K * C
    for k in tl.static_range(K):
        logit, d = _logit(x, g, lc_ptr, h_ptr, mu_ptr, k, c, C, K)
        tau = tl.exp(logit - m - log_total)
        a = tl.load(a_ptr + (g * K + k) * C + c)
        centred = x - tl.load(alpha_ptr + k * C + c)
        gt = gy * tau
        dl = gt * (a * centred - tau_u)
        dx += gt * a - 2.0 * dl * tl.load(h_ptr + k * C + c) * d
        _group_store(row, gt, g, mask, k, c, C, K, G, 0)
        _group_store(row, gt * centred, g, mask, k, c, C, K, G, 1)
        _group_store(row, dl, g, mask, k, c, C, K, G, 2)
        _group_store(row, dl * d, g, mask, k, c, C, K, G, 3)
        _group_store(row, dl * d * d, g, mask, k, c, C, K, G, 4)
    tl.store(dx_ptr + offsets, dx, mask=mask)


@triton.jit
def _stats_backward_kernel(x_ptr, ctx_ptr, lc_ptr, h_ptr, mu_ptr, shift_ptr, d_ptr, dx_ptr, out_ptr,
                           N, C, P, K: tl.constexpr, G: tl.constexpr, BLOCK: tl.constexpr, HAS_CTX: tl.constexpr,
                           ACCUMULATE: tl.constexpr):
    c, chunk = tl.program_id(0), tl.program_id(1)
    x, g, offsets, mask = _load_position(x_ptr, ctx_ptr, c, chunk * BLOCK, N, C, P, BLOCK, HAS_CTX)
    m, log_total = _normaliser(x, g, lc_ptr, h_ptr, mu_ptr, c, C, K)
    xt = x - tl.load(shift_ptr + c)
    tau_e = tl.zeros_like(x)  # Σ_k τ_k e_k, e_k = d0_k + (d1_k + d2_k xt) xt
    for k in tl.static_range(K):
        logit, _ = _logit(x, g, lc_ptr, h_ptr, mu_ptr, k, c, C, K)
        e = tl.load(d_ptr + k * C + c) + (tl.load(d_ptr + (K + k) * C + c) + tl.load(d_ptr + (2 * K + k) * C + c) * xt) * xt
        tau_e += tl.exp(logit - m - log_total) * e
    dx = tl.zeros_like(x)
    row = out_ptr + chunk * 3 * G * K * C
    for k in tl.static_range(K):
        logit, d = _logit(x, g, lc_ptr, h_ptr, mu_ptr, k, c, C, K)
        tau = tl.exp(logit - m - log_total)
        d1 = tl.load(d_ptr + (K + k) * C + c)
        d2 = tl.load(d_ptr + (2 * K + k) * C + c)
        e = tl.load(d_ptr + k * C + c) + (d1 + d2 * xt) * xt
        dl = tau * (e - tau_e)
        dx += tau * (d1 + 2.0 * d2 * xt) - 2.0 * dl * tl.load(h_ptr + k * C + c) * d
        _group_store(row, dl, g, mask, k, c, C, K, G, 0)
        _group_store(row, dl * d, g, mask, k, c, C, K, G, 1)
        _group_store(row, dl * d * d, g, mask, k, c, C, K, G, 2)
    if ACCUMULATE:
        dx += tl.load(dx_ptr + offsets, mask=mask, other=0.0)
    tl.store(dx_ptr + offsets, dx, mask=mask)


def _grid(x: Tensor) -> tuple[int, int]:
    n, c, p = x.shape
    return c, max(triton.cdiv(n * p, BLOCK), 1)


def _context(x: Tensor, ctx: Tensor | None) -> Tensor:
    return ctx if ctx is not None else x.new_zeros(1, dtype=torch.int64)


def pass_sums(x: Tensor, t: Tables, lc: Tensor, h: Tensor, shift: Tensor) -> Tensor:
    """S (3, K, C) about ``shift``."""
    k, (c, chunks) = t.mu.shape[0], _grid(x)
    partial = x.new_zeros(chunks, 3, k, c)
    if x.numel():
        _sums_kernel[(c, chunks)](x, _context(x, t.ctx), lc.contiguous(), h.contiguous(), t.mu, shift.contiguous(),
                                  partial, x.shape[0], c, x.shape[2], K=k, BLOCK=BLOCK, HAS_CTX=t.ctx is not None)
    return partial.sum(0)


def pass_output(x: Tensor, t: Tables, s: Stats) -> Tensor:
    k, (c, chunks) = t.mu.shape[0], _grid(x)
    y = torch.empty_like(x)
    if x.numel():
        _output_kernel[(c, chunks)](x, _context(x, t.ctx), s.lc.contiguous(), s.h.contiguous(), t.mu, s.A.contiguous(),
                                    s.alpha.contiguous(), t.beta.contiguous(), y, x.shape[0], c, x.shape[2], K=k,
                                    BLOCK=BLOCK, HAS_CTX=t.ctx is not None)
    return y


def pass_output_backward(gy: Tensor, x: Tensor, t: Tables, s: Stats) -> tuple[Tensor, Tensor]:
    """∂L/∂x's direct part and the reductions E0, E1, L0, R1, R2, (5, G, K, C)."""
    k, g, (c, chunks) = t.mu.shape[0], s.lc.shape[0], _grid(x)
    dx, partial = torch.empty_like(x), x.new_zeros(chunks, 5, g, k, c)
    if x.numel():
        _output_backward_kernel[(c, chunks)](x, gy, _context(x, t.ctx), s.lc.contiguous(), s.h.contiguous(), t.mu,
                                             s.A.contiguous(), s.alpha.contiguous(), dx, partial, x.shape[0], c,
                                             x.shape[2], K=k, G=g, BLOCK=BLOCK, HAS_CTX=t.ctx is not None)
    return dx, partial.sum(0)


def pass_stats_backward(x: Tensor, t: Tables, lc: Tensor, h: Tensor, shift: Tensor, coefficients: Tensor,
                        dx: Tensor | None) -> tuple[Tensor, Tensor]:
    """∂L/∂x through the sums given ∂L/∂(S0, S1, S2) (3, K, C), added to ``dx`` (or new), and the
    logit reductions L0, R1, R2 (3, G, K, C)."""
    k, g, (c, chunks) = t.mu.shape[0], lc.shape[0], _grid(x)
    out = dx if dx is not None else torch.empty_like(x)
    partial = x.new_zeros(chunks, 3, g, k, c)
    if x.numel():
        _stats_backward_kernel[(c, chunks)](x, _context(x, t.ctx), lc.contiguous(), h.contiguous(), t.mu,
                                            shift.contiguous(), coefficients.contiguous(), out, partial, x.shape[0],
                                            c, x.shape[2], K=k, G=g, BLOCK=BLOCK, HAS_CTX=t.ctx is not None,
                                            ACCUMULATE=dx is not None)
    return out, partial.sum(0)


def _shift(x: Tensor) -> Tensor:
    return x[0, :, 0].detach().clone() if len(x) else x.new_zeros(x.shape[1])


class TritonTransform(Function):
    """The transform as one node over the Triton passes (the arguments of ``kernel.transform``)."""

    @staticmethod
    def forward(ctx, x, context, eps, floors, running, want_stats, weight_param, mu, var_param, gamma, beta, alpha,
                delta2, delta2_floor):
        t = Tables(context, mu, weight_param, var_param, gamma, beta, eps, floors, delta2_floor)
        log_weight, var, h, lc = tables(t)
        shift = sums_ = None
        if alpha is None:
            shift = _shift(x)
            sums_ = pass_sums(x, t, lc, h, shift)
            alpha, delta2 = moments(sums_, shift)
        s = Stats(log_weight, var, h, lc, shift, sums_, alpha, delta2, scales(t, log_weight, delta2))
        return finish_forward(ctx, x, t, s, pass_output(x, t, s), running, want_stats)

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, *unused):
        (x,) = ctx.saved_tensors
        t, s = ctx.tables, ctx.stats
        dx, (E0, E1, L0, R1, R2) = pass_output_backward(gy.contiguous(), x, t, s)
        g_alpha, g_delta2 = statistic_grads(E0, E1, t, s)
        g_h, g_lc, g_mu = -R2.sum(0), L0, R1.sum(0)
        if s.sums is not None:  # the stats pass, through α, δ² to the sums
            coefficients = torch.stack(sum_grads(g_alpha, g_delta2, s.sums))
            dx, (L0s, R1s, R2s) = pass_stats_backward(x, t, s.lc, s.h, s.shift, coefficients, dx)
            g_h, g_lc, g_mu = g_h - R2s.sum(0), g_lc + L0s, g_mu + R1s.sum(0)
        return node_grads(ctx, dx, parameter_grads(t, s, E0, E1, g_h, g_lc, g_mu, g_alpha, g_delta2))


class TritonSums(Function):
    """``kernel.sums`` on the Triton passes: S forward, the stats pass backward."""

    @staticmethod
    def forward(ctx, x, context, floors, weight_param, mu, var_param):
        t = Tables(context, mu, weight_param, var_param, mu.new_ones(mu.shape[1]), mu.new_zeros(mu.shape[1]), 0.0,
                   floors)
        _, _, h, lc = tables(t)
        shift = _shift(x)
        ctx.save_for_backward(x, shift)
        ctx.tables = t
        return pass_sums(x, t, lc, h, shift), shift

    @staticmethod
    @once_differentiable
    def backward(ctx, g_sums, g_shift):
        x, shift = ctx.saved_tensors
        t = ctx.tables
        _, var, h, lc = tables(t)
        dx, (L0, R1, R2) = pass_stats_backward(x, t, lc, h, shift, g_sums, None)
        g_weight, g_mu, g_var = mixture_grads(t, var, h, -R2.sum(0), R1.sum(0), L0, L0)
        return dx, None, None, g_weight, g_mu, g_var


def transform(*args) -> tuple[Tensor, ...]:
    return TritonTransform.apply(*args)


def sums(x: Tensor, context: Tensor | None, floors, weight_param: Tensor, mu: Tensor,
         var_param: Tensor) -> tuple[Tensor, Tensor]:
    return TritonSums.apply(x, context, floors, weight_param, mu, var_param)


__all__ = ["Running", "sums", "transform"]
