"""The compiled CPU kernel as registered torch operators: autograd and fake implementations.

``mixture_ops.cpp`` defines four functional CPU operators in the ``adamatch_uan`` namespace
(``torch.library``): ``mixture_forward`` → (y, batch statistics, workspace),
``mixture_backward``, ``mixture_sums`` → (sums, shift, workspace) and ``mixture_sums_backward``.
This module loads the library (``build.load``), registers each forward's autograd formula
(its backward operator) and a fake implementation for all four (shapes only), so that
autograd, ``torch.compile``, ``torch.export`` and ``torch.jit.trace`` see the kernel as
operators, and ``torch.library.opcheck`` checks them. A graph that holds them needs this
package's library to run; ``export.py`` writes the torch-ops form instead, which needs torch alone.

The running averages are updated here from the batch statistics the forward returns, so
that the operators mutate nothing. x (and so y, ∂L/∂y, ∂L/∂x) may be bfloat16 with float32
tables: the kernel widens on load and rounds on store, computing in float32.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from adamatch_uan.norm.backends.torch_ops import Running

NAMESPACE = "adamatch_uan"


def workspace_size(x: Tensor, mu: Tensor, groups: int, parametrised: bool, batch: bool, tau_cache_bytes: int) -> int:
    """Elements of the forward's workspace (``Layout`` in ``mixture_ops.cpp``), in the tables' dtype (``mu``'s):
    the tables of UAN's parametrisation, h, lc, the scales, the sums and statistics with batch statistics, and
    the responsibilities when they fit in ``tau_cache_bytes``."""
    n, c, p = x.shape
    components = mu.shape[0]
    kc, gkc = components * c, groups * components * c
    size = (2 * gkc + 2 * kc if parametrised else 0) + kc + 3 * gkc
    if batch:
        size += c + 5 * kc
        if n * c * p * components * mu.element_size() <= tau_cache_bytes:
            size += n * kc * p
    return size


def _fake_forward(x, context, weight_param, mu, var_param, gamma, beta, alpha, delta2, delta2_floor, eps, min_weight,
                  min_var, parametrised, tau_cache_bytes):
    k, c = mu.shape
    stats = mu.new_empty((0 if alpha is not None else 3, k, c))
    work = mu.new_empty(workspace_size(x, mu, weight_param.shape[0], parametrised, alpha is None, tau_cache_bytes))
    return torch.empty_like(x), stats, work


def _fake_backward(grad, x, context, weight_param, mu, var_param, gamma, beta, alpha, delta2, delta2_floor, work, eps,
                   min_weight, min_var, parametrised, tau_cache_bytes, need_param_grads):
    return (torch.empty_like(x), torch.empty_like(weight_param), torch.empty_like(mu), torch.empty_like(var_param),
            torch.empty_like(gamma), torch.empty_like(beta), mu.new_empty((2, *mu.shape)))


def _fake_sums(x, context, weight_param, mu, var_param, min_weight, min_var, parametrised):
    k, c = mu.shape
    work = mu.new_empty(workspace_size(x, mu, weight_param.shape[0], parametrised, True, 0))
    return mu.new_empty((3, k, c)), mu.new_empty((c,)), work


def _fake_sums_backward(grad_sums, x, context, weight_param, mu, var_param, work, min_weight, min_var, parametrised):
    return torch.empty_like(x), torch.empty_like(weight_param), torch.empty_like(mu), torch.empty_like(var_param)


_FORWARD_ARGS = ("x", "context", "weight_param", "mu", "var_param", "gamma", "beta", "alpha", "delta2", "delta2_floor")


def _save(ctx, tensors: tuple, work: Tensor, options: tuple) -> None:
    """Keep the optional tensor inputs, the workspace and the options for the backward."""
    ctx.save_for_backward(*(t for t in tensors if t is not None), work)
    ctx.present = [t is not None for t in tensors]
    ctx.options = options


def _saved(ctx) -> tuple[list, Tensor]:
    """The tensors ``_save`` kept (None where an optional one was absent) and the workspace."""
    saved = list(ctx.saved_tensors)
    work = saved.pop()
    it = iter(saved)
    return [next(it) if present else None for present in ctx.present], work


def _setup_forward(ctx, inputs, output) -> None:
    _save(ctx, inputs[:len(_FORWARD_ARGS)], output[2], inputs[len(_FORWARD_ARGS):])
    ctx.mark_non_differentiable(output[1], output[2])


def _backward_forward(ctx, gy, g_stats, g_work):
    if torch.is_grad_enabled():
        raise RuntimeError("the mixture transform cannot be differentiated twice (backward with create_graph=True)")
    tensors, work = _saved(ctx)
    x, context, weight_param, mu, var_param, gamma, beta, alpha, delta2, delta2_floor = tensors
    eps, min_weight, min_var, parametrised, tau_cache_bytes = ctx.options
    need_params = any(ctx.needs_input_grad[2:5])
    dx, g_weight, g_mu, g_var, g_gamma, g_beta, g_given = torch.ops.adamatch_uan.mixture_backward(
        gy if gy is not None else torch.zeros_like(x), *tensors, work, eps, min_weight, min_var, parametrised,
        tau_cache_bytes, need_params)
    given = alpha is not None
    return (dx, None, g_weight, g_mu, g_var, g_gamma, g_beta, g_given[0] if given else None,
            g_given[1] if given else None, None, None, None, None, None, None)


def _setup_sums(ctx, inputs, output) -> None:
    _save(ctx, inputs[:5], output[2], inputs[5:])
    ctx.mark_non_differentiable(output[1], output[2])


def _backward_sums(ctx, g_sums, g_shift, g_work):
    if torch.is_grad_enabled():
        raise RuntimeError("the mixture transform cannot be differentiated twice (backward with create_graph=True)")
    (x, context, weight_param, mu, var_param), work = _saved(ctx)
    if g_sums is None:
        g_sums = mu.new_zeros((3, *mu.shape))
    dx, g_weight, g_mu, g_var = torch.ops.adamatch_uan.mixture_sums_backward(
        g_sums, x, context, weight_param, mu, var_param, work, *ctx.options)
    return dx, None, g_weight, g_mu, g_var, None, None, None


def ops():
    """``torch.ops.adamatch_uan`` with the kernel loaded and its autograd and fake implementations
    registered (once per process), or None when the kernel is off or failed to build (``build.load``).

    Raises:
        KernelBuildError: the build failed and ``ADAMATCH_UAN_KERNEL=1`` (the same error at every call:
            one build attempt per process).
    """
    if _build_error is not None:
        raise _build_error
    return _load()


_build_error: Exception | None = None


@functools.cache
def _load():
    global _build_error
    from adamatch_uan.norm.backends import build  # not at import: `python -m ...backends.build` runs it as __main__

    try:
        path = build.load()
    except build.KernelBuildError as error:
        _build_error = error
        raise
    if path is None:
        return None
    library = torch.ops.adamatch_uan
    for name, fake in (("mixture_forward", _fake_forward), ("mixture_backward", _fake_backward),
                       ("mixture_sums", _fake_sums), ("mixture_sums_backward", _fake_sums_backward)):
        torch.library.register_fake(f"{NAMESPACE}::{name}", fake)
    torch.library.register_autograd(f"{NAMESPACE}::mixture_forward", _backward_forward, setup_context=_setup_forward)
    torch.library.register_autograd(f"{NAMESPACE}::mixture_sums", _backward_sums, setup_context=_setup_sums)
    return library


@torch.no_grad()
def update_running(count: Tensor, alpha: Tensor, delta2: Tensor, running: Running) -> None:
    """r ← r + momentum (batch − r), δ² corrected by S0 / max(S0 − 1, 1) (BatchNorm's n / (n − 1) at K = 1)."""
    mean, var, momentum = running
    mean.lerp_(alpha.to(mean.dtype), momentum)
    var.lerp_((delta2 * count / (count - 1).clamp_min(1)).to(var.dtype), momentum)


def transform(x: Tensor, context: Tensor | None, eps: float, floors: tuple[float, float] | None,
              running: Running | None, want_stats: bool, weight_param: Tensor, mu: Tensor, var_param: Tensor,
              gamma: Tensor, beta: Tensor, alpha: Tensor | None, delta2: Tensor | None, delta2_floor: Tensor | None,
              tau_cache_bytes: int) -> tuple[Tensor, ...]:
    """``backends.transform`` on the compiled kernel's operators."""
    w, v = floors or (0.0, 0.0)
    y, stats, _ = ops().mixture_forward(x, context, weight_param, mu, var_param, gamma, beta, alpha, delta2,
                                        delta2_floor, eps, w, v, floors is not None, tau_cache_bytes)
    if alpha is not None:
        return (y,)
    if running is not None:
        update_running(stats[0], stats[1], stats[2], running)
    return (y, stats[0], stats[1], stats[2]) if want_stats else (y,)


def sums(x: Tensor, context: Tensor | None, floors: tuple[float, float] | None, weight_param: Tensor, mu: Tensor,
         var_param: Tensor) -> tuple[Tensor, Tensor]:
    """``backends.sums`` on the compiled kernel's operators."""
    w, v = floors or (0.0, 0.0)
    s, shift, _ = ops().mixture_sums(x, context, weight_param, mu, var_param, w, v, floors is not None)
    return s, shift
