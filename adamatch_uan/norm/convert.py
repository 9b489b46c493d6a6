"""Put MN or UAN into any model: ``convert_norms`` swaps its BatchNorm layers, ``WithContext`` threads a context.

    model = torchvision.models.resnet18(num_classes=10)
    model = WithContext(convert_norms(model, "uan_ctx"))       # every BatchNorm becomes UAN, λ per domain
    logits = model(images, context=domain_ids)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from adamatch_uan.norm.context import uses_context
from adamatch_uan.norm.mn import MixtureNorm, spread_start
from adamatch_uan.norm.uan import UAN


class ContextSlot(nn.Module):
    """A converted layer in a model that calls it as ``layer(x)``: the context of the current
    ``WithContext`` call reaches it through ``self.context`` (None outside such a call)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.context: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x, self.context)


class WithContext(nn.Module):
    """``forward(x, context=None)`` for a model with context-aware layers (``ContextSlot``): the
    per-sample context is set on them for this call only and cleared after it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        slots = [m for m in self.model.modules() if isinstance(m, ContextSlot)]
        for slot in slots:
            slot.context = context
        try:
            return self.model(x)
        finally:
            for slot in slots:
                slot.context = None


@torch.no_grad()
def start_from_batchnorm(layer: nn.Module, bn: _BatchNorm) -> None:
    """Copy γ, β, ε and momentum of ``bn`` into a UAN or MN layer, and start its mixture from
    bn's running statistics (m, v): μ_k = m + sqrt(v) Φ⁻¹((k + ½)/K), equal weights, a common
    σ² that gives the mixture mean m and variance v; at K = 1, μ = m and σ² = v."""
    if getattr(layer, "weight", None) is not None and bn.weight is not None:
        layer.weight.copy_(bn.weight)
        layer.bias.copy_(bn.bias)
    layer.eps = bn.eps
    if bn.momentum is not None:
        layer.momentum = bn.momentum
    if bn.running_mean is None:
        return
    m, v = bn.running_mean.float(), bn.running_var.float().clamp_min(1e-12)
    _, mean, var = spread_start(m, v, layer.num_components, 0.0)
    if isinstance(layer, UAN):
        layer.mean.copy_(mean)
        raw = (var - layer.min_var).clamp_min(1e-12)
        layer.raw_var.copy_(raw + torch.log(-torch.expm1(-raw)))  # softplus⁻¹
        layer.running_mean.copy_(mean)
        layer.running_var.copy_(var)
        layer.running_channel_var.copy_(v)
    elif isinstance(layer, MixtureNorm):
        for prefix in ("fit", "running"):
            getattr(layer, f"{prefix}_mean").copy_(mean)
            getattr(layer, f"{prefix}_var").copy_(var)
            getattr(layer, f"{prefix}_channel_var").copy_(v)
        layer.running_alpha.copy_(mean)
        layer.running_delta2.copy_(var)
        layer.num_fits.fill_(1)  # the first fit then warm-starts from these estimates


def convert_norms(model: nn.Module, norm: str | Callable[..., nn.Module],
                  match: tuple[type[nn.Module], ...] = (_BatchNorm,), **options) -> nn.Module:
    """Replace every module of ``model`` that is an instance of ``match`` (BatchNorm by default)
    with ``make_norm(norm, num_features, **options)``, in place, and return the model.

    γ, β, ε and momentum are copied and a UAN or MN layer's mixture starts from the replaced
    layer's running statistics (``start_from_batchnorm``). Context-aware layers are wrapped in a
    ``ContextSlot``: wrap the model in ``WithContext`` to give them a context per forward.

    Raises:
        ValueError: an unknown norm name, or no module of the matched types in ``model``.
    """
    from adamatch_uan.norm import make_norm  # the registry imports this module

    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, match) and name]
    if not targets:
        raise ValueError(f"Expected modules of type {[t.__name__ for t in match]} to convert in "
                         f"{type(model).__name__}, found none")
    for name, old in targets:
        new = make_norm(norm, old.num_features, **options)
        if isinstance(old, _BatchNorm) and hasattr(new, "num_components"):
            start_from_batchnorm(new, old)
        new.train(old.training)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, ContextSlot(new) if uses_context(new) else new)
    return model

