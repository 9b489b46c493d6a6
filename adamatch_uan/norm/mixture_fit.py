"""How UAN's learned mixture is tied to the activations it models (docs/METHOD.md §4).

The paper learns (λ, μ, σ²) by backpropagating the task loss alone. In training μ and σ²
enter the output only through τ, whose dependence on them is weak when the components
overlap, so they barely move from their initialisation (docs/RESULTS.md, "A mixture that
learns"), and nothing ties μ_k, σ_k² to the batch statistics α_k, δ_k² that the paper's
inference rule replaces with them. Two named ways to tie them live here:

- ``likelihood``: the negative log-likelihood of the layer's detached input under its own
  mixture, NLL = −mean_x log Σ_k λ_k N(x; μ_k, σ_k²), is added to the training objective with
  a weight (gradient-based EM: its stationary points are EM's fixed points, where
  μ_k = α_k, σ_k² = δ_k² about μ_k and λ_k = the share of τ_k).
- momentum updates of μ, σ² towards the batch statistics, what the authors' published code
  effectively does, and of λ towards the batch's component shares (``stepwise_update``,
  stepwise EM).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd import Function

from adamatch_uan.norm.sync import all_reduce


def log_joint(values: Tensor, rows: Tensor, log_weight: Tensor, mean: Tensor, var: Tensor,
              context: Tensor | None) -> Tensor:
    """log λ_gk + log N(x; μ_k, σ_k²) of sampled activations, (S, K, C), in float32 (float64 stays
    float64) with autocast off; g is the context of the sample each value comes from.

    Args:
        values: (S, C) detached activations (``mixture.sample_positions``).
        rows: the sample each value comes from (S,).
        log_weight: log λ (G, K, C), one table per context.
        mean, var: μ, σ² (K, C).
        context: per-sample context ids (N,) or None (table 0).
    """
    compute = torch.float64 if values.dtype == torch.float64 else torch.float32
    with torch.autocast(values.device.type, enabled=False):
        table = log_weight[:1] if context is None else log_weight[context[rows]]  # (1 or S, K, C)
        var = var.to(compute)
        return (table.to(compute) - 0.5 * torch.log(2 * math.pi * var)
                - (values.to(compute).unsqueeze(1) - mean.to(compute)) ** 2 / (2 * var))


def mixture_nll(values: Tensor, rows: Tensor, log_weight: Tensor, mean: Tensor, var: Tensor,
                context: Tensor | None) -> Tensor:
    """NLL = −(1/C) Σ_c mean_x log Σ_k λ_gk N(x; μ_k, σ_k²) of sampled activations (``log_joint``'s
    arguments), in log space: an unbiased estimate of the full batch's at a cost of (S, K, C).

    Returns:
        A scalar with gradients to (log λ, μ, σ²) only.
    """
    return -torch.logsumexp(log_joint(values, rows, log_weight, mean, var, context), dim=1).mean()


@torch.no_grad()
def component_shares(values: Tensor, rows: Tensor, log_weight: Tensor, mean: Tensor, var: Tensor,
                     context: Tensor | None, process_group=False) -> tuple[Tensor, Tensor]:
    """Per context g, the mean responsibility of each component over its sampled values:
    share_gk = mean_{x in g} τ_k(x), (G, K, C), and which contexts had values (G,); with a
    ``process_group`` (None: every process; False: this one alone) over every process's values."""
    tau = torch.softmax(log_joint(values, rows, log_weight, mean, var, context), dim=1)  # (S, K, C)
    groups = log_weight.shape[0]
    group = context[rows] if context is not None else torch.zeros_like(rows)
    total = tau.new_zeros(groups, *tau.shape[1:]).index_add_(0, group, tau)
    count = torch.bincount(group, minlength=groups).to(tau.dtype)
    if process_group is not False:
        total, count = all_reduce(total, process_group), all_reduce(count, process_group)
    return total / count.clamp_min(1).view(-1, 1, 1), count > 0


class _AddToObjective(Function):
    """Identity on x; its backward also gives ``extra`` the gradient ``weight``, as if
    ``weight · extra`` had been added to the loss that x's gradient comes from."""

    @staticmethod
    def forward(ctx, x: Tensor, extra: Tensor, weight: float) -> Tensor:
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, grad.new_tensor(ctx.weight), None


def add_to_objective(x: Tensor, extra: Tensor, weight: float) -> Tensor:
    """Return x unchanged, with ``weight · extra`` joining the objective of whatever loss x reaches.

    The layer that calls this needs no cooperation from the training loop: any loss
    backpropagated through the returned tensor also minimises ``weight · extra``. The result
    is a view of x: pass it on to an op that reads it, not to one that writes it in place.
    """
    return _AddToObjective.apply(x, extra, weight)


@torch.no_grad()
def stepwise_update(prior_logits: Tensor, mean: Tensor, raw_var: Tensor, shares: Tensor, present: Tensor,
                    alpha: Tensor, delta2: Tensor, momentum: float, min_weight: float, min_var: float) -> None:
    """Stepwise EM: λ ← λ + m (share − λ), μ ← μ + m (α − μ), σ² ← σ² + m (δ² − σ²), written
    through UAN's parametrisation λ = w + (1 − K w) softmax(prior_logits), σ² = softplus(raw_var) + v_min.

    The momentum writes of μ and σ² are what the authors' published code effectively does
    (their λ were constant, by a defect); λ follows each context's component shares
    (``component_shares``; contexts without values keep theirs). The task gradient still moves
    all three between writes.
    """
    tiny = torch.finfo(mean.dtype).tiny
    K = prior_logits.shape[1]
    weights = min_weight + (1 - K * min_weight) * torch.softmax(prior_logits, dim=1)
    target = weights.lerp(shares.to(weights.dtype), momentum)
    logits = torch.log(((target - min_weight) / (1 - K * min_weight)).clamp_min(tiny))
    prior_logits.copy_(torch.where(present.view(-1, 1, 1), logits - logits.mean(1, keepdim=True), prior_logits))
    mean.lerp_(alpha.to(mean.dtype), momentum)
    var = torch.nn.functional.softplus(raw_var) + min_var
    target = (var.lerp(delta2.to(var.dtype), momentum) - min_var).clamp_min(tiny)
    # softplus⁻¹(v) = v + log(−expm1(−v)), stable for small and large v.
    raw_var.copy_(target + torch.log(-torch.expm1(-target)))
