"""Unsupervised Adaptive Normalization (UAN, Faye et al., IJCNN 2024; ALGORITHMS.md §4)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from adamatch_uan.norm.kernel import parametrise
from adamatch_uan.norm.mixture import LearnedMixture, Mixture, mixture_normalize

Inference = Literal["learned", "running"]


def spread_means(num_components: int) -> Tensor:
    """Standard-normal quantiles Φ⁻¹((k + ½)/K): K means spread over a normalized activation's range."""
    levels = (torch.arange(num_components, dtype=torch.float64) + 0.5) / num_components
    return torch.special.ndtri(levels).float()


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
    ``"learned"`` (the paper) puts α_k → μ_k and δ_k² → σ_k²; ``"running"`` uses running
    averages of α_k and δ_k² (momentum as in BatchNorm; δ_k² is stored with the correction
    S0/(S0 − 1), which is BatchNorm's n/(n − 1) at K = 1).

    With ``num_contexts`` set, each context has its own λ_{ctx,k,c} (μ, σ² shared) and
    ``forward(x, context)`` takes a per-sample context id (N,) (or one int for the batch);
    without one, ``default_context`` (the source, 0) is used, in training and evaluation.

    Args:
        num_features: channels C.
        num_components: mixture components K.
        eps: ε added to δ_k² (and σ_k² in learned inference).
        momentum: running-average momentum for ``inference="running"``.
        inference: ``"learned"`` or ``"running"``.
        num_contexts: number of context ids, or None for the plain unsupervised layer.
        default_context: context id used when forward gets none.
        affine: learn γ, β.
        min_var: floor of σ².
        min_weight: floor of λ (a numerical guard; 0 for the plain softmax).

    Shape:
        x: (N, C) or (N, C, *spatial); output has the same shape and dtype.
    """

    def __init__(self, num_features: int, num_components: int = 3, eps: float = 1e-5,
                 momentum: float = 0.1, inference: Inference = "learned", num_contexts: int | None = None,
                 default_context: int = 0, affine: bool = True, min_var: float = 1e-3,
                 min_weight: float = 1e-6) -> None:
        super().__init__()
        if inference not in ("learned", "running"):
            raise ValueError(f"Expected inference 'learned' or 'running', got {inference!r}")
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
        means = spread_means(num_components)
        var = max(1.0 - float(means.pow(2).mean()), 2 * min_var)
        K, C, G = num_components, num_features, num_contexts or 1
        self.prior_logits = nn.Parameter(torch.zeros(G, K, C))
        self.mean = nn.Parameter(means[:, None].repeat(1, C))
        # softplus⁻¹(v) = log(expm1(v)) puts σ² at `var` initially.
        self.raw_var = nn.Parameter(torch.full((K, C), var - min_var).expm1().log())
        self.weight = nn.Parameter(torch.ones(C)) if affine else None
        self.bias = nn.Parameter(torch.zeros(C)) if affine else None
        self.register_buffer("running_mean", self.mean.detach().clone())
        self.register_buffer("running_var", torch.full((K, C), var))
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
        return context

    def forward(self, x: Tensor, context: Tensor | int | None = None) -> Tensor:
        context = self._context(context, x.shape[0], x.device)
        # The transform differentiates through the parametrisation itself (one autograd node).
        learned = LearnedMixture(self.prior_logits, self.mean, self.raw_var, self.min_weight, self.min_var)
        if self.training:
            running = (self.running_mean, self.running_var, self.momentum)
            y, _ = mixture_normalize(x, learned, self.weight, self.bias, self.eps, context, running=running,
                                     batch_stats=False)
            self.num_batches_tracked.add_(1)
            return y
        stats = (self.mean, self.var) if self.inference == "learned" else (self.running_mean, self.running_var)
        return mixture_normalize(x, learned, self.weight, self.bias, self.eps, context, stats)[0]

    def extra_repr(self) -> str:
        return (f"{self.num_features}, num_components={self.num_components}, eps={self.eps}, "
                f"inference={self.inference!r}, num_contexts={self.num_contexts}")
