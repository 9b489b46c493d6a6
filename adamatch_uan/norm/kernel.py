"""The mixture transform's four calls, as a compiled CPU kernel or as torch ops.

Every call takes ``x`` of shape (N, C, P) and a :class:`Tables` holding the per-channel 1-D
Gaussian mixture as ``mu`` (K, C), ``h = 1 / (2 sigma^2)`` (K, C) and
``lc = log lambda - 0.5 log(2 pi sigma^2)`` (G, K, C), where sample n uses the tables of its
group ``ctx[n]`` (group 0 when ``ctx`` is None). Responsibilities are
``tau_k = softmax_k(lc_k - h_k (x - mu_k)^2)``. The formulas are in ``mixture.py``.

- ``batch_sums``: shift s (C,) = each channel's first value, and S (3, K, C) = sums over
  positions of tau_k * {1, x - s, (x - s)^2}.
- ``output``: alpha, delta^2 from (s, S), or given; A = gamma lambda^(-1/2) (delta^2 + eps)^(-1/2);
  y = beta + sum_k tau_k A[g, k] (x - alpha_k).
- ``output_backward``: the input gradient's direct part and the reductions
  E0, E1, L0, R1, R2 (5, G, K, C).
- ``finish_backward``: the gradient of S, the stats pass's part of the input gradient
  (added in place) and every parameter gradient.

Between the first two calls, and between the last two, a distributed version can all-reduce
S and the reductions. The compiled kernel (``mixture_kernel.cpp``) recomputes tau in
registers in each pass, so a pass reads x once, and does the (K, C)-sized maths between
passes itself. It vectorizes along the positions of each (sample, channel) row when P > 1,
and along the channels of each sample for (N, C, 1) inputs. It is built with the system C++
compiler on first use and cached in ``$ADAMATCH_UAN_CACHE`` (default
``~/.cache/adamatch_uan``). It serves contiguous CPU float32/float64 inputs with K <= 8.
Everything else, and every input when the environment sets ``ADAMATCH_UAN_KERNEL=0`` or no
compiler is found, runs on the torch-ops backend.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

_SOURCE = Path(__file__).with_name("mixture_kernel.cpp")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros",
          "-fassociative-math", "-std=c++17", "-shared", "-fPIC"]
# Below this many elements a pass is cheaper on one thread than waking the others.
_PARALLEL_MIN_ELEMENTS = 1 << 15


class _MixArgs(ctypes.Structure):
    _fields_ = [("x", ctypes.c_void_p), ("ctx", ctypes.c_void_p), ("grad", ctypes.c_void_p),
                ("N", ctypes.c_int64), ("C", ctypes.c_int64), ("P", ctypes.c_int64),
                ("K", ctypes.c_int64), ("G", ctypes.c_int64),
                *((name, ctypes.c_void_p) for name in ("mu", "h", "lc", "log_weight", "var", "gamma", "beta")),
                ("eps", ctypes.c_double),
                *((name, ctypes.c_void_p) for name in ("shift", "sums", "alpha", "delta2", "A", "dS", "out", "red",
                                                       "red2", "grads")),
                ("need_param_grads", ctypes.c_int64)]


class Tables(NamedTuple):
    """What every call reads besides x: groups, mixture and output-map parameters, each
    contiguous in the compute dtype. ``gamma``, ``beta`` (C,); ``log_weight`` (G, K, C) log λ;
    ``var`` (K, C) σ²; ``mu``, ``h``, ``lc`` as in the module docstring."""

    ctx: Tensor | None
    mu: Tensor
    h: Tensor
    lc: Tensor
    log_weight: Tensor
    var: Tensor
    gamma: Tensor
    beta: Tensor
    eps: float


class Stats(NamedTuple):
    """What ``output`` computed and the backward reuses: the shift and sums (None with given
    statistics), α and δ² (K, C), and the output scales A (G, K, C)."""

    shift: Tensor | None
    sums: Tensor | None
    alpha: Tensor
    delta2: Tensor
    A: Tensor


class Grads(NamedTuple):
    """Gradients of the loss w.r.t. log λ (G, K, C), μ, σ² (K, C), γ, β (C,) and given α, δ² (K, C)."""

    log_weight: Tensor
    mu: Tensor
    var: Tensor
    gamma: Tensor
    beta: Tensor
    alpha: Tensor
    delta2: Tensor


def _cpu_signature() -> str:
    # -march=native code must not be reused on a CPU with fewer instructions.
    try:
        flags = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return platform.machine() + flags


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("ADAMATCH_UAN_KERNEL", "1") == "0":
        return None
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if compiler is None:
        warnings.warn("No C++ compiler found: the mixture layers run on the slower torch-ops backend.")
        return None
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([compiler, *_FLAGS, _cpu_signature()]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("ADAMATCH_UAN_CACHE", Path.home() / ".cache" / "adamatch_uan"))
    target = cache / f"mixture_kernel-{key}.so"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            built = Path(tmp) / target.name
            result = subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", str(built)],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                warnings.warn(f"Building the mixture kernel failed; using the torch-ops backend.\n{result.stderr[-2000:]}")
                return None
            os.replace(built, target)  # atomic: concurrent builders never see a partial file
    lib = ctypes.CDLL(str(target))
    for name in ("mix_stats", "mix_apply", "mix_apply_backward", "mix_finish_backward"):
        getattr(lib, name).argtypes = [ctypes.c_int, ctypes.POINTER(_MixArgs), ctypes.c_int]
    return lib


def kernel_available() -> bool:
    """Whether the compiled CPU kernel can be used in this process."""
    return _library() is not None


def _uses_kernel(x: Tensor, mu: Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and x.is_contiguous()
            and mu.shape[0] <= 8 and _library() is not None)


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _run(name: str, x: Tensor, t: Tables, **buffers: Tensor | None) -> None:
    """Run one exported kernel call; ``buffers`` name the MixArgs pointers it reads or writes."""
    N, C, P = x.shape
    args = _MixArgs(x=_ptr(x), ctx=_ptr(t.ctx), N=N, C=C, P=P, K=t.mu.shape[0], G=t.lc.shape[0],
                    mu=_ptr(t.mu), h=_ptr(t.h), lc=_ptr(t.lc), log_weight=_ptr(t.log_weight), var=_ptr(t.var),
                    gamma=_ptr(t.gamma), beta=_ptr(t.beta), eps=t.eps,
                    need_param_grads=int(bool(buffers.pop("need_param_grads", False))),
                    **{key: _ptr(value) for key, value in buffers.items()})
    is_double = int(x.dtype == torch.float64)
    threads = min(torch.get_num_threads(), C) if x.numel() >= _PARALLEL_MIN_ELEMENTS else 1
    if getattr(_library(), name)(is_double, ctypes.byref(args), threads):
        raise RuntimeError(f"mixture kernel {name} failed for K = {t.mu.shape[0]}")


# ---- torch-ops backend: the same passes, materialising (N, K, C, P) tensors ----

def _responsibilities(x: Tensor, t: Tables) -> tuple[Tensor, Tensor]:
    table = t.lc[t.ctx] if t.ctx is not None else t.lc.expand(x.shape[0], -1, -1)
    d = x.unsqueeze(1) - t.mu.unsqueeze(-1)
    return torch.softmax(table.unsqueeze(-1) - t.h.unsqueeze(-1) * d * d, dim=1), d


def _per_sample(table: Tensor, t: Tables, n: int) -> Tensor:
    """(G, K, C) -> (N, K, C, 1): each sample's row of a per-group table."""
    return (table[t.ctx] if t.ctx is not None else table.expand(n, -1, -1)).unsqueeze(-1)


def _group_sum(per_sample: Tensor, t: Tables) -> Tensor:
    """(N, K, C) -> (G, K, C): sum of each group's samples."""
    if t.ctx is None:
        return per_sample.sum(0, keepdim=True)
    return per_sample.new_zeros(t.lc.shape[0], *per_sample.shape[1:]).index_add_(0, t.ctx, per_sample)


def _logit_reductions(dl: Tensor, d: Tensor, t: Tables) -> list[Tensor]:
    return [_group_sum((dl * d**i).sum(-1), t) for i in range(3)]


def _safe_moments(sums: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """S0 floored at sqrt(tiny) (an empty component gets α = s, δ² = 0), S1/S0, S2/S0."""
    safe = sums[0].clamp_min(torch.finfo(sums.dtype).tiny ** 0.5)
    return safe, sums[1] / safe, sums[2] / safe


def batch_sums(x: Tensor, t: Tables) -> tuple[Tensor, Tensor]:
    """Shift s (C,) and the shifted sums S (3, K, C) of the responsibilities over all positions."""
    if _uses_kernel(x, t.mu):
        shift, sums = x.new_empty(x.shape[1]), x.new_empty(3, *t.mu.shape)
        _run("mix_stats", x, t, shift=shift, sums=sums)
        return shift, sums
    shift = x[0, :, 0].clone()
    tau, _ = _responsibilities(x, t)
    xt = (x - shift.view(1, -1, 1)).unsqueeze(1)
    return shift, torch.stack([tau.sum((0, 3)), (tau * xt).sum((0, 3)), (tau * xt * xt).sum((0, 3))])


def output(x: Tensor, t: Tables, shift: Tensor | None, sums: Tensor | None,
           given: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Stats]:
    """y = beta + sum_k tau_k A[g, k] (x - alpha_k), with α, δ² from (shift, sums) or ``given``."""
    if _uses_kernel(x, t.mu):
        alpha, delta2 = (x.new_empty(t.mu.shape), x.new_empty(t.mu.shape)) if given is None else given
        A, y = x.new_empty(t.lc.shape), torch.empty_like(x)
        _run("mix_apply", x, t, shift=shift, sums=sums, alpha=alpha, delta2=delta2, A=A, out=y)
        return y, Stats(shift, sums, alpha, delta2, A)
    if given is None:
        _, m1, m2 = _safe_moments(sums)
        alpha, delta2 = shift + m1, (m2 - m1 * m1).clamp_min(0)
    else:
        alpha, delta2 = given
    A = t.gamma * torch.exp(-0.5 * t.log_weight) * torch.rsqrt(delta2 + t.eps)
    tau, _ = _responsibilities(x, t)
    y = t.beta.view(1, -1, 1) + (tau * _per_sample(A, t, x.shape[0]) * (x.unsqueeze(1) - alpha.unsqueeze(-1))).sum(1)
    return y, Stats(shift, sums, alpha, delta2, A)


def output_backward(gy: Tensor, x: Tensor, t: Tables, stats: Stats, need_param_grads: bool) -> tuple[Tensor, Tensor]:
    """The input gradient's direct part and reductions (5, G, K, C): E0 = sum g tau,
    E1 = sum g tau (x - alpha), and sum dl (x - mu)^i for i = 0, 1, 2, dl the gradient of the logits."""
    if _uses_kernel(x, t.mu):
        dx, red = torch.empty_like(x), x.new_empty(5, *t.lc.shape)
        _run("mix_apply_backward", x, t, grad=gy, alpha=stats.alpha, A=stats.A, out=dx, red=red,
             need_param_grads=need_param_grads)
        return dx, red
    tau, d = _responsibilities(x, t)
    scale = _per_sample(stats.A, t, x.shape[0])
    centred = x.unsqueeze(1) - stats.alpha.unsqueeze(-1)
    u = scale * centred
    gt = gy.unsqueeze(1) * tau
    dl = gt * (u - (tau * u).sum(1, keepdim=True))
    dx = (gt * scale).sum(1) - 2 * (dl * t.h.unsqueeze(-1) * d).sum(1)
    return dx, torch.stack([_group_sum(gt.sum(-1), t), _group_sum((gt * centred).sum(-1), t),
                            *_logit_reductions(dl, d, t)])


def finish_backward(dx: Tensor, red: Tensor, x: Tensor, t: Tables, stats: Stats, need_param_grads: bool) -> Grads:
    """Add the stats pass's part of the input gradient to ``dx`` (batch statistics only) and
    return every parameter gradient, following the backward derived in ``mixture.py``."""
    if _uses_kernel(x, t.mu):
        G, K, C = t.lc.shape
        grads = x.new_empty(G * K * C + 4 * K * C + 2 * C)
        batch = stats.sums is not None
        _run("mix_finish_backward", x, t, shift=stats.shift, sums=stats.sums, alpha=stats.alpha,
             delta2=stats.delta2, A=stats.A, out=dx, red=red, grads=grads,
             dS=x.new_empty(3, K, C) if batch else None, red2=x.new_empty(3, G, K, C) if batch else None,
             need_param_grads=need_param_grads)
        # The packed layout of MixArgs.grads: log_weight, mu, var, alpha, delta2, gamma, beta.
        lw, mu, var, alpha, delta2, gamma, beta = grads.split([G * K * C, *[K * C] * 4, C, C])
        return Grads(lw.view(G, K, C), mu.view(K, C), var.view(K, C), gamma, beta, alpha.view(K, C), delta2.view(K, C))
    E0, E1, L0, R1, R2 = red
    A = stats.A
    g_alpha = -(A * E0).sum(0)
    g_delta2 = -0.5 * (E1 * A).sum(0) / (stats.delta2 + t.eps)
    g_h, g_lc, g_mu = -R2.sum(0), L0, R1.sum(0)
    if stats.sums is not None:
        count = stats.sums[0]
        safe, m1, m2 = _safe_moments(stats.sums)
        g_raw = g_delta2 * (m2 - m1 * m1 >= 0)
        g_S0 = -(g_alpha * m1 + g_raw * (m2 - 2 * m1 * m1)) / safe * (count >= safe)
        d0, d1, d2 = (g.unsqueeze(-1) for g in (g_S0, (g_alpha - 2 * m1 * g_raw) / safe, g_raw / safe))
        tau, d = _responsibilities(x, t)
        xt = (x - stats.shift.view(1, -1, 1)).unsqueeze(1)
        e = d0 + (d1 + d2 * xt) * xt
        dl = tau * (e - (tau * e).sum(1, keepdim=True))
        dx += (tau * (d1 + 2 * d2 * xt)).sum(1) - 2 * (dl * t.h.unsqueeze(-1) * d).sum(1)
        L0s, R1s, R2s = _logit_reductions(dl, d, t)
        g_h, g_lc, g_mu = g_h - R2s.sum(0), g_lc + L0s, g_mu + R1s.sum(0)
    rstd = torch.rsqrt(stats.delta2 + t.eps)
    return Grads(log_weight=g_lc - 0.5 * E1 * A, mu=2 * t.h * g_mu, var=-0.5 * (g_h / t.var + g_lc.sum(0)) / t.var,
                 gamma=(E1 * torch.exp(-0.5 * t.log_weight) * rstd).sum((0, 1)), beta=E0.sum((0, 1)),
                 alpha=g_alpha, delta2=g_delta2)
