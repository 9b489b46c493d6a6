"""BatchNorm with the domain as context (per-domain BatchNorm, DSBN: Chang et al., CVPR 2019), and GroupNorm.

``DomainBatchNorm`` keeps BatchNorm's statistics per context id (source = 0, target = 1): in
training each domain's samples are normalized with their own batch's mean and variance, and
update their own running averages; in evaluation each sample uses the running averages of its
context. γ, β are shared, or per context with ``affine_per_context``. It is UAN ctx's K = 1
counterpart: the domain as context without a mixture. Which context target images are evaluated
with is the method's choice (``target_context``: 1, each domain its own statistics, DSBN's rule;
0, the source's, the UAN authors' rule). With one context it is BatchNorm, exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adamatch_uan.norm.mixture import validate_context


class DomainBatchNorm(nn.Module):
    """BatchNorm with statistics (and optionally γ, β) per context.

    Args:
        num_features: channels C.
        num_contexts: G context ids.
        eps: ε of the normalization.
        momentum: of the running averages (BatchNorm's convention).
        affine: learn γ, β.
        affine_per_context: one γ, β per context instead of shared ones.
        default_context: the context of a call without one.

    Shape:
        x: (N, C) or (N, C, *spatial); context: (N,) ints, one int, or None.
    """

    uses_context = True

    def __init__(self, num_features: int, num_contexts: int = 2, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = True, affine_per_context: bool = False, default_context: int = 0) -> None:
        super().__init__()
        if num_contexts < 1 or not 0 <= default_context < num_contexts:
            raise ValueError(f"Expected num_contexts ≥ 1 and default_context in [0, {num_contexts}), got "
                             f"{num_contexts} and {default_context}")
        self.num_features, self.num_contexts, self.eps, self.momentum = num_features, num_contexts, eps, momentum
        self.default_context, self.affine_per_context = default_context, affine_per_context
        rows = num_contexts if affine_per_context else 1
        self.weight = nn.Parameter(torch.ones(rows, num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(rows, num_features)) if affine else None
        self.register_buffer("running_mean", torch.zeros(num_contexts, num_features))
        self.register_buffer("running_var", torch.ones(num_contexts, num_features))
        self.register_buffer("num_batches_tracked", torch.zeros(num_contexts, dtype=torch.long))

    def forward(self, x: Tensor, context: Tensor | int | None = None) -> Tensor:
        if x.dim() < 2:
            raise ValueError(f"Expected input of shape (N, C, *spatial), got {tuple(x.shape)}")
        n = x.shape[0]
        if context is None or isinstance(context, int):
            ids = None
            groups = [self.default_context if context is None else context]
        else:
            ids = validate_context(context, n, self.num_contexts, x.device)
            groups = ids.unique().tolist()
        if len(groups) == 1:  # one domain in the batch (every evaluation set): one call, no copies
            return self._normalize(x, groups[0])
        y = torch.empty_like(x)
        for g in groups:
            rows = (ids == g).nonzero().squeeze(1)
            y[rows] = self._normalize(x[rows], g)
        return y

    def _normalize(self, x: Tensor, g: int) -> Tensor:
        """BatchNorm of ``x`` (one context's samples) with context ``g``'s statistics and parameters."""
        row = g if self.affine_per_context else 0
        weight = self.weight[row] if self.weight is not None else None
        bias = self.bias[row] if self.bias is not None else None
        if self.training:
            self.num_batches_tracked[g] += 1
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.momentum is None:  # a cumulative average, as torch's BatchNorm
            momentum = 1.0 / float(self.num_batches_tracked[g])
        # Views into the (G, C) buffers: F.batch_norm updates them in place.
        return F.batch_norm(x, self.running_mean[g], self.running_var[g], weight, bias, self.training, momentum,
                            self.eps)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, num_contexts={self.num_contexts}, eps={self.eps}, momentum={self.momentum}, "
                f"affine_per_context={self.affine_per_context}")


def group_norm(num_features: int, num_groups: int = 32, eps: float = 1e-5, affine: bool = True,
               momentum: float | None = None) -> nn.GroupNorm:
    """GroupNorm (Wu & He, 2018) for C channels: batch-independent, no running statistics. The groups are the
    largest divisor of C not above ``num_groups`` (a 3-channel input slot gets 3, a 64-channel layer 32).
    ``momentum`` is ignored: there are no running statistics (backbones give every norm WRN's BN momentum)."""
    groups = max(g for g in range(1, min(num_groups, num_features) + 1) if num_features % g == 0)
    return nn.GroupNorm(groups, num_features, eps=eps, affine=affine)
