"""The mixture normalizing transform (docs/METHOD.md §2), written once for MN and UAN.

Given a per-channel 1-D Gaussian mixture (λ, μ, σ²) that defines the responsibilities

    τ_k(x) = λ_k N(x; μ_k, σ_k²) / Σ_j λ_j N(x; μ_j, σ_j²)          (log space)

the transform is

    α_k  = Σ_pos τ_k x / Σ_pos τ_k
    δ_k² = Σ_pos τ_k (x − α_k)² / Σ_pos τ_k
    y    = γ Σ_k [τ_k / sqrt(λ_k)] (x − α_k) / sqrt(δ_k² + ε) + β.

The responsibilities are passed as the mixture that defines them, not as a (N, K, C, ...)
tensor: the fused passes in ``backends`` recompute log τ from (λ, μ, σ²) where they need it,
so memory stays that of BatchNorm. α and δ² come from three per-(k, c) sums taken about a
per-channel shift s (the first value of each channel), Σ τ, Σ τ(x − s), Σ τ(x − s)², which is
exact in real arithmetic and avoids the cancellation of Σ τ x² for large |x|; the sums are
what a distributed version all-reduces (with a shift common to all processes).

The layer is one autograd node (``backends.transform``; registered operators on the compiled kernel): two
full-size passes forward (sums, output) and two backward (analytic, the second adding to
the first's input gradient); the small (K, C) maths between them is differentiated by hand
too, and done inside the compiled kernel's calls when it serves the input (one call
forward, one backward). Gradients flow to x, to the mixture (through τ) or to a learned
mixture's parameters (UAN), and to γ, β; the mixture may instead be constant (MN's EM
estimates).

Forward, with h = 1/(2σ²), lc = log λ − ½ log(2πσ²) and sums S about the shift s:
    α = s + S1/S0,  δ² = max(S2/S0 − (S1/S0)², 0),  A_gk = γ λ_gk^(−½) (δ_k² + ε)^(−½),
    y = β + Σ_k τ_k A_gk (x − α_k).
Backward: the output pass gives ∂L/∂x (direct part) and E0 = Σ g τ, E1 = Σ g τ (x − α);
then ∂L/∂α = −Σ_g A E0, ∂L/∂A = E1, ∂L/∂δ² = −½ Σ_g E1 A / (δ² + ε), and through α, δ² to
∂L/∂S, which the sums pass turns into the rest of ∂L/∂x and the responsibilities' part of
∂L/∂(μ, h, lc), and on to (log λ, σ²) and, for a learned mixture, its parameters (the
torch-ops backend differentiates that parametrisation with a local autograd call).
The shift is a constant: ∂α/∂s = 1 − S0/S0 = 0 in exact arithmetic.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import NamedTuple

import torch
from torch import Tensor

from adamatch_uan.norm import backends
from adamatch_uan.norm.sync import distributed, global_statistics


class Mixture(NamedTuple):
    """A per-channel 1-D Gaussian mixture.

    Shape:
        log_weight: (G, K, C) log λ, one table per context (G = 1 without contexts).
        mean: (K, C) μ.
        var: (K, C) σ² > 0.
    """

    log_weight: Tensor
    mean: Tensor
    var: Tensor


class LearnedMixture(NamedTuple):
    """A per-channel 1-D Gaussian mixture in UAN's parametrisation (``torch_ops.parametrise``):
    λ = w + (1 − K w) softmax_k(prior_logits), σ² = softplus(raw_var) + v_min.

    Shape:
        prior_logits: (G, K, C).
        mean: (K, C) μ.
        raw_var: (K, C).
        min_weight, min_var: the floors w and v_min.
    """

    prior_logits: Tensor
    mean: Tensor
    raw_var: Tensor
    min_weight: float
    min_var: float


class BatchStats(NamedTuple):
    """Responsibility-weighted batch statistics, each (K, C): Σ τ_k, α_k and biased δ_k²."""

    count: Tensor
    mean: Tensor
    var: Tensor


def validate_context(context: Tensor | None, n: int, groups: int, device: torch.device) -> Tensor | None:
    """Check per-sample context ids (N,) against ``groups`` tables; return them as int64 on ``device``."""
    if context is None:
        return None
    if context.shape != (n,) or context.dtype.is_floating_point or context.dtype == torch.bool:
        raise ValueError(f"Expected an integer context id per sample of shape ({n},), got "
                         f"{tuple(context.shape)} {context.dtype}")
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        # A graph cannot branch on the ids' values: the check becomes an op of the graph.
        torch._assert_async(((context >= 0) & (context < groups)).all(), f"Expected context ids in [0, {groups})")
    elif n and (int(context.min()) < 0 or int(context.max()) >= groups):
        raise ValueError(f"Expected context ids in [0, {groups}), got values in "
                         f"[{int(context.min())}, {int(context.max())}]")
    return context.to(device=device, dtype=torch.int64).contiguous()


def channels_last(x: Tensor) -> bool:
    """Whether ``x`` (N, C, H, W) is laid out channels-last (and not also in torch's default layout)."""
    return (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())


def positions(x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """The (N', C, P) view of ``x`` the passes read, and each of its rows' context.

    (N, C, *spatial) in torch's default layout → (N, C, P), P the product of the spatial sizes (1
    for (N, C); an empty batch too). A channels-last (N, C, H, W) → (N·H·W, C, 1): each position a
    row of C channel values, which is how its memory lies, so the view copies nothing; each sample's
    context is repeated over its positions. Statistics over rows and positions are the same either way.
    """
    if channels_last(x):
        n, c, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c, 1)
        return rows, None if context is None else context.repeat_interleave(h * w)
    return x.reshape(x.shape[0], x.shape[1], math.prod(x.shape[2:])), context


def from_positions(y: Tensor, like: Tensor) -> Tensor:
    """``positions``' inverse: y (N', C, P) back to the shape and layout of ``like``."""
    if channels_last(like):
        n, c, h, w = like.shape
        return y.view(n, h, w, c).permute(0, 3, 1, 2)
    return y.reshape(like.shape)


def spread_mixture(num_components: int) -> tuple[Tensor, float]:
    """K means at the standard-normal quantiles Φ⁻¹((k + ½)/K) and the common variance
    1 − mean_k μ_k² that gives the equal-weight mixture mean 0 and variance 1: a start spread
    over a normalized activation's range, never two components alike."""
    levels = (torch.arange(num_components, dtype=torch.float64) + 0.5) / num_components
    means = torch.special.ndtri(levels)
    return means.float(), float(1.0 - means.pow(2).mean())


def sample_positions(x: Tensor, max_samples: int) -> tuple[Tensor, Tensor]:
    """The values of x (N, C, P) at up to ``max_samples`` positions, the same positions for every channel.

    All N·P positions when there are no more than ``max_samples``, else positions drawn
    uniformly with replacement (an unbiased sample whatever the input's size).

    Returns:
        The sample each position belongs to (S,) and the values (S, C), detached.
    """
    n, c, p = x.shape
    if n * p <= max_samples:
        rows = torch.arange(n, device=x.device).repeat_interleave(p)
        return rows, x.detach().transpose(1, 2).reshape(n * p, c)
    picks = torch.randint(n * p, (max_samples,), device=x.device)
    rows = picks // p
    return rows, x.detach()[rows, :, picks % p]


def sample_moments(values: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and biased variance per channel of sampled values (S, C), S ≥ 1, in float32 (float64 stays).

    Shifted moments about the first sample v₀: m = mean_s(v − v₀), var = mean_s((v − v₀)²) − m²,
    mean = v₀ + m. The shift keeps float32 from cancelling when the mean is large against the spread,
    and column sums are vectorized where torch's Welford variance over dim 0 is not.
    """
    v = values.detach().to(torch.promote_types(values.dtype, torch.float32))
    d = v - v[0]
    m = d.mean(0)
    return v[0] + m, (d.square().mean(0) - m.square()).clamp_min(0)


def mixture_normalize(x: Tensor, mixture: Mixture | LearnedMixture, weight: Tensor | None, bias: Tensor | None,
                      eps: float, context: Tensor | None = None, stats: tuple[Tensor, Tensor] | None = None,
                      running: backends.Running | None = None, batch_stats: bool = True,
                      delta2_floor: Tensor | None = None, sync: bool = False,
                      group=None) -> tuple[Tensor, BatchStats | None]:
    """Apply the mixture normalizing transform of docs/METHOD.md §2.

    Statistics and the output are computed in float32 (float64 stays float64) with autocast
    off; the result has the dtype of ``x``.

    Args:
        x: activations, (N, C, *spatial) or (N, C).
        mixture: the mixture that defines τ, given directly or as a learned mixture's
            parameters (gradients then flow to those); its weights have one table per context.
        weight: γ (C,) or None (1).
        bias: β (C,) or None (0).
        eps: ε added to δ_k².
        context: per-sample context ids (N,) selecting the weight table; None uses table 0.
        stats: (α, δ²), each (K, C), to use instead of batch statistics (evaluation).
        running: (running α, running δ², momentum): with batch statistics, updated in place
            as r ← r + momentum (batch − r), δ² corrected by Σ τ / (Σ τ − 1).
        batch_stats: return the batch statistics (False skips making them for the caller).
        delta2_floor: (C,) a floor of δ_k² (a constant to backpropagation), or None:
            max(δ_k², floor_c) replaces δ_k² in y (not in the returned or running statistics).
        sync: with batch statistics in a distributed run (``sync.distributed(group)``), take
            them over every process of ``group`` (``sync.global_statistics``); a process may
            then have an empty batch.
        group: the process group (None: the default, every process).

    Returns:
        The normalized tensor (shape and dtype of x) and the batch statistics (None when
        ``stats`` was given or ``batch_stats`` is False).
    """
    if x.dim() < 2:
        raise ValueError(f"Expected input of shape (N, C, *spatial), got {tuple(x.shape)}")
    n, c = x.shape[:2]
    synced = stats is None and sync and distributed(group)
    if stats is None and not synced and x.numel() < 2 * c:
        raise ValueError(f"Expected more than 1 value per channel in training to compute batch statistics, "
                         f"got input of shape {tuple(x.shape)}")
    floors = mixture[3:] if isinstance(mixture, LearnedMixture) else None
    context = validate_context(context, n, mixture[0].shape[0], x.device)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.autocast(x.device.type, enabled=False) if torch.is_autocast_enabled(x.device.type) else nullcontext():
        # Statistics in float32 for bfloat16/float16 inputs: the compiled kernel reads bfloat16 itself, other
        # backends get a float32 copy (docs/RESULTS.md, "The CPU step in bfloat16 and channels-last").
        x3, context = positions(x, context)
        x3 = (x3 if backends.reads_bfloat16(x3, mixture[1]) else x3.to(compute)).contiguous()
        gamma = weight if weight is not None else torch.ones(c, device=x.device)
        beta = bias if bias is not None else torch.zeros(c, device=x.device)
        given = (None, None) if stats is None else stats
        # The kernel reads raw pointers: every table contiguous in the compute dtype.
        tensors = [t if t is None or (t.dtype == compute and t.is_contiguous()) else t.to(compute).contiguous()
                   for t in (*mixture[:3], gamma, beta, *given, delta2_floor)]
        if synced:
            return _synced(x3, x, context, eps, floors, running, batch_stats, tensors, group)
        out = backends.transform(x3, context, eps, floors, running, batch_stats, *tensors)
    batch = BatchStats(*out[1:]) if len(out) > 1 else None
    return from_positions(out[0].to(x.dtype), x), batch


def _synced(x3: Tensor, x: Tensor, context: Tensor | None, eps: float, floors, running: backends.Running | None,
            batch_stats: bool, tensors: list, group) -> tuple[Tensor, BatchStats | None]:
    """The transform with every process's batch statistics: local sums, all-reduced, then given."""
    weight_param, mu, var_param, gamma, beta, _, _, delta2_floor = tensors
    sums, shift = backends.sums(x3, context, floors, weight_param, mu, var_param)
    count, alpha, delta2 = global_statistics(sums, shift, len(x3) > 0, group)
    if running is not None:
        with torch.no_grad():
            mean, var, momentum = running
            mean.lerp_(alpha.to(mean.dtype), momentum)
            var.lerp_((delta2 * count / (count - 1).clamp_min(1)).to(var.dtype), momentum)
    (y,) = backends.transform(x3, context, eps, floors, None, False, weight_param, mu, var_param, gamma, beta,
                            alpha.contiguous(), delta2.contiguous(), delta2_floor)
    batch = BatchStats(count, alpha.detach(), delta2.detach()) if batch_stats else None
    return from_positions(y.to(x.dtype), x), batch
