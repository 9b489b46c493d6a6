"""The mixture transform's backends, and the dispatcher that says which one runs a call.

One module per backend: the compiled CPU kernel (``mixture_kernel.cpp`` and the operators of
``mixture_ops.cpp``, built by ``build.py`` and registered with autograd and fake
implementations by ``cpu_kernel.py``), Triton kernels for CUDA tensors (``triton_ops.py``)
and torch ops for everything else (``torch_ops.py``, which also holds the (K, C) maths the
Triton node shares). :func:`backend` says which a layer gets.

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
its calls. The compiled kernel recomputes tau in registers in each pass, so a pass reads x
once, except that inputs whose tau fits in ``TAU_CACHE_BYTES`` keep the forward's first tau
for the other three passes; it does the (K, C)-sized maths between passes itself. The passes
work on blocks of one vector register: positions of a (sample, channel) row when P > 1,
channels of a sample for (N, C, 1) inputs. It is built on first use (or ahead of time with
``python -m adamatch_uan.norm.backends.build``) and serves contiguous CPU float32/float64
inputs with K ≤ ``MAX_COMPONENTS``, and bfloat16 ones with float32 tables (loads widen, stores round,
everything computes in float32). Everything else, and every input when the environment
sets ``ADAMATCH_UAN_KERNEL=0`` or the build fails (with a loud warning), runs on the
torch-ops backend, which materialises (N, K, C, P) tensors. CUDA inputs with K ≤
``MAX_COMPONENTS`` run on the Triton kernels when Triton imports (``ADAMATCH_UAN_TRITON=0``
turns them off), else on torch ops; on first use they run a self-check against torch ops (a
tiny problem, float32 and bfloat16 inputs), and a failure warns once, loudly, and falls back to
torch ops (``ADAMATCH_UAN_TRITON=1`` makes it an error). :func:`torch_ops_only` makes every call in its block
run on torch ops (the form ``export.py`` writes, which needs torch alone).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor

from adamatch_uan.norm.backends import cpu_kernel, torch_ops
from adamatch_uan.norm.backends.torch_ops import Running

# The most components the compiled and Triton kernels serve, written here only: build.py compiles the
# kernel with it (its kMaxK, which it checks; its passes keep one register per component).
MAX_COMPONENTS = 8

# Up to this size the forward keeps the responsibilities (K x the input) for the later
# passes, which then skip their exponentials; beyond it they recompute them, as reading a
# cache that falls out of the CPU caches would cost more than the exponentials.
TAU_CACHE_BYTES = 4 << 20

_forced = threading.local()


def kernel_available() -> bool:
    """Whether the compiled CPU kernel can be used in this process."""
    return cpu_kernel.ops() is not None


TRITON_FIX = ("ADAMATCH_UAN_TRITON=0 chooses torch ops without this check; ADAMATCH_UAN_TRITON=1 makes a failed "
              "check an error")


class TritonCheckError(RuntimeError):
    """The Triton kernels failed their self-check and ``ADAMATCH_UAN_TRITON=1`` asked for them."""


def self_check(triton_ops, device: torch.device | str) -> str | None:
    """Run the Triton passes on a tiny problem on ``device`` (float32 and bfloat16 inputs, batch statistics and
    given ones, forward and backward) against torch ops; return why they fail, or None."""
    try:
        g = torch.Generator().manual_seed(0)
        rand = lambda *shape: torch.randn(*shape, generator=g).to(device)  # noqa: E731
        for dtype in (torch.float32, torch.bfloat16):
            for given in (False, True):
                x = rand(4, 3, 5).to(dtype).float().requires_grad_()
                tables = [rand(1, 2, 3), rand(2, 3), rand(2, 3), rand(3) + 1, rand(3)]
                stats = [rand(2, 3), rand(2, 3).abs() + 0.1] if given else [None, None]
                results = []
                for run in (triton_ops.transform, torch_ops.TorchTransform.apply):
                    leaves = [t.detach().clone().requires_grad_() for t in (x, *tables)]
                    (y,) = run(leaves[0], None, 1e-5, (0.01, 0.05), None, False, *leaves[1:], *stats, None)[:1]
                    y.square().sum().backward()
                    results.append([y.detach(), *(t.grad for t in leaves)])
                for got, want in zip(*results):
                    if not torch.allclose(got, want, rtol=1e-3, atol=1e-4):
                        return f"its results differ from torch ops by up to {(got - want).abs().max().item():.2e}"
    except Exception as error:  # a compiler, driver or launch failure: any of them means "not usable here"
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return None


@functools.cache
def _triton():
    """The Triton backend's module once it passed its self-check on the GPU, or None (no Triton,
    ``ADAMATCH_UAN_TRITON=0``, or a failed check: warned once, loudly, with the cause and the fix).

    Raises:
        TritonCheckError: a failed check with ``ADAMATCH_UAN_TRITON=1``.
    """
    policy = os.environ.get("ADAMATCH_UAN_TRITON", "")
    if policy == "0":
        return None
    try:
        from adamatch_uan.norm.backends import triton_ops
    except ImportError as error:
        if policy == "1":
            raise TritonCheckError(f"ADAMATCH_UAN_TRITON=1 but Triton does not import: {error}") from error
        return None
    cause = self_check(triton_ops, "cuda" if torch.cuda.is_available() else "cpu")
    if cause is not None:
        if policy == "1":
            raise TritonCheckError(f"The Triton kernels failed their self-check: {cause}")
        warnings.warn(f"\n{'=' * 78}\nThe Triton kernels failed their self-check on this GPU, so MN and UAN layers on "
                      f"CUDA run on torch ops (slower, same results).\nCause: {cause}\n{TRITON_FIX}\n{'=' * 78}",
                      stacklevel=2)
        return None
    return triton_ops


@contextlib.contextmanager
def torch_ops_only() -> Iterator[None]:
    """Every mixture transform in this block (this thread) runs on the torch-ops backend."""
    previous = getattr(_forced, "torch", False)
    _forced.torch = True
    try:
        yield
    finally:
        _forced.torch = previous


def backend(device: torch.device | str, num_components: int) -> str:
    """Which backend a mixture layer with K components on ``device`` runs (float32/64 inputs): a short phrase."""
    if getattr(_forced, "torch", False):
        return "torch ops (torch_ops_only)"
    if torch.device(device).type == "cuda":
        if num_components > MAX_COMPONENTS:
            return f"torch ops (K > {MAX_COMPONENTS})"
        return "the Triton kernels" if _triton() is not None else "torch ops (Triton is off or not installed)"
    if torch.device(device).type != "cpu":
        return "torch ops (no compiled kernel for this device)"
    if num_components > MAX_COMPONENTS:
        return f"torch ops (K > {MAX_COMPONENTS})"
    if not kernel_available():
        return "torch ops (the compiled kernel is off or failed to build: see the warning)"
    return "the compiled CPU kernel"


def _uses_triton(x: Tensor, mu: Tensor) -> bool:
    return (x.is_cuda and mu.shape[0] <= MAX_COMPONENTS and x.is_contiguous() and _triton() is not None
            and not getattr(_forced, "torch", False))


def _uses_kernel(x: Tensor, mu: Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64, torch.bfloat16) and x.is_contiguous()
            and mu.shape[0] <= MAX_COMPONENTS and not getattr(_forced, "torch", False) and kernel_available())


def reads_bfloat16(x: Tensor, mu: Tensor) -> bool:
    """Whether the backend serving ``x`` reads and writes bfloat16 itself (the compiled kernel, computing in
    float32), so a bfloat16 input needs no conversion to float32 around it."""
    return x.dtype == torch.bfloat16 and _uses_kernel(x, mu)


def transform(x: Tensor, context: Tensor | None, eps: float, floors: tuple[float, float] | None,
              running: Running | None, want_stats: bool, weight_param: Tensor, mu: Tensor, var_param: Tensor,
              gamma: Tensor, beta: Tensor, alpha: Tensor | None, delta2: Tensor | None,
              delta2_floor: Tensor | None = None) -> tuple[Tensor, ...]:
    """The transform of ``x`` (N, C, P) as one autograd node, on the compiled kernel's operators or the
    Triton kernels when they serve the input, else on torch ops.

    The tables are those of :class:`Tables`, each contiguous in the dtype of x. α, δ² (K, C)
    given, or None for batch statistics; ``delta2_floor`` (C,), a constant, or None: the
    transform normalizes by max(δ², floor) + ε. With batch statistics ``running`` averages
    (of the unfloored α, δ²) are updated in place
    (r ← r + momentum (batch − r), δ² corrected by S0 / max(S0 − 1, 1), BatchNorm's
    n / (n − 1) at K = 1). Returns (y,), or with batch statistics and ``want_stats``
    (y, S0, α, δ²), the last three (K, C) and not differentiable.
    """
    if _uses_kernel(x, mu):
        return cpu_kernel.transform(x, context, eps, floors, running, want_stats, weight_param, mu, var_param, gamma,
                                    beta, alpha, delta2, delta2_floor, TAU_CACHE_BYTES)
    args = (x, context, eps, floors, running, want_stats, weight_param, mu, var_param, gamma, beta, alpha, delta2,
            delta2_floor)
    if _uses_triton(x, mu):
        return _triton().transform(*args)
    tensors = (x, weight_param, mu, var_param, gamma, beta, alpha, delta2)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)):
        # Plain tensor ops, without the autograd node: what tracers and exporters record as it is.
        return torch_ops.transform_without_grad(*args)
    return torch_ops.TorchTransform.apply(*args)


def sums(x: Tensor, context: Tensor | None, floors: tuple[float, float] | None, weight_param: Tensor, mu: Tensor,
         var_param: Tensor) -> tuple[Tensor, Tensor]:
    """The transform's sums alone, differentiable: S (3, K, C) = Σ_pos τ_k {1, x − s, (x − s)²} about
    each channel's first value s (C,; 0 for an empty batch), the tables as in ``transform``.

    A distributed run all-reduces S between this call and ``transform`` with the statistics it
    gives; the backward of S is the stats pass's (the compiled operators' or Triton's; autograd's on torch ops).
    """
    if _uses_kernel(x, mu):
        return cpu_kernel.sums(x, context, floors, weight_param, mu, var_param)
    if _uses_triton(x, mu):
        return _triton().sums(x, context, floors, weight_param, mu, var_param)
    return torch_ops.sums(x, context, floors, weight_param, mu, var_param)
