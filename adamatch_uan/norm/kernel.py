"""The four passes of the mixture transform, as a fused CPU kernel or as torch ops.

Every pass takes ``x`` of shape (N, C, P) and a per-channel 1-D Gaussian mixture given as
``mu`` (K, C), ``h = 1 / (2 sigma^2)`` (K, C) and ``lc = log lambda - 0.5 log(2 pi sigma^2)``
(G, K, C), where sample n uses the log-prior table of its group ``ctx[n]`` (group 0 when
``ctx`` is None). Responsibilities are ``tau_k = softmax_k(lc_k - h_k (x - mu_k)^2)``.

- ``stats``: S (3, K, C) = sums over positions of tau_k * {1, x - shift, (x - shift)^2}.
- ``apply``: y = beta + sum_k tau_k A[g, k] (x - alpha_k).
- ``apply_backward`` and ``stats_backward``: the input gradient (the second adds its part
  to the first's) and the per-group reductions from which the caller forms every
  parameter gradient (see ``mixture.py``).

The compiled kernel (``mixture_kernel.cpp``) recomputes tau in registers in each pass, so a
pass reads x once. It vectorizes along the positions of each (sample, channel) row when
P > 1, and along the channels of each sample for (N, C, 1) inputs (no transpose). It is built with the system C++ compiler on first use and cached in
``$ADAMATCH_UAN_CACHE`` (default ``~/.cache/adamatch_uan``). It serves contiguous CPU
float32/float64 inputs with K <= 8. Everything else, and every input when the environment
sets ``ADAMATCH_UAN_KERNEL=0`` or no compiler is found, runs on the torch-ops backend.
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
                ("mu", ctypes.c_void_p), ("h", ctypes.c_void_p), ("lc", ctypes.c_void_p),
                ("shift", ctypes.c_void_p), ("alpha", ctypes.c_void_p), ("A", ctypes.c_void_p),
                ("beta", ctypes.c_void_p), ("dS", ctypes.c_void_p), ("out", ctypes.c_void_p),
                ("red", ctypes.c_void_p), ("need_param_grads", ctypes.c_int64)]


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
    for name in ("mix_stats", "mix_apply", "mix_apply_backward", "mix_stats_backward"):
        getattr(lib, name).argtypes = [ctypes.c_int, ctypes.POINTER(_MixArgs), ctypes.c_int]
    return lib


def kernel_available() -> bool:
    """Whether the compiled CPU kernel can be used in this process."""
    return _library() is not None


def _uses_kernel(x: Tensor, mu: Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and mu.shape[0] <= 8 and _library() is not None)


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _run(name: str, x: Tensor, ctx: Tensor | None, mu: Tensor, h: Tensor, lc: Tensor, *,
         out: Tensor | None = None, red: Tensor | None = None, grad: Tensor | None = None,
         shift: Tensor | None = None, alpha: Tensor | None = None, A: Tensor | None = None,
         beta: Tensor | None = None, dS: Tensor | None = None, need_param_grads: bool = False) -> None:
    N, C, P = x.shape
    keep = [t if t is None or t.is_contiguous() else t.contiguous()
            for t in (x, ctx, grad, mu, h, lc, shift, alpha, A, beta, dS)]
    x, ctx, grad, mu, h, lc, shift, alpha, A, beta, dS = keep
    args = _MixArgs(_ptr(x), _ptr(ctx), _ptr(grad), N, C, P, mu.shape[0], lc.shape[0],
                    _ptr(mu), _ptr(h), _ptr(lc), _ptr(shift), _ptr(alpha), _ptr(A), _ptr(beta),
                    _ptr(dS), _ptr(out), _ptr(red), int(need_param_grads))
    is_double = int(x.dtype == torch.float64)
    threads = min(torch.get_num_threads(), C) if x.numel() >= _PARALLEL_MIN_ELEMENTS else 1
    if getattr(_library(), name)(is_double, ctypes.byref(args), threads):
        raise RuntimeError(f"mixture kernel {name} failed for K = {mu.shape[0]}")


# ---- torch-ops backend: the same passes, materialising (N, K, C, P) tensors ----

def _responsibilities(x: Tensor, ctx: Tensor | None, mu: Tensor, h: Tensor, lc: Tensor) -> tuple[Tensor, Tensor]:
    table = lc[ctx] if ctx is not None else lc.expand(x.shape[0], -1, -1)
    d = x.unsqueeze(1) - mu.unsqueeze(-1)
    return torch.softmax(table.unsqueeze(-1) - h.unsqueeze(-1) * d * d, dim=1), d


def _group_sum(per_sample: Tensor, ctx: Tensor | None, groups: int) -> Tensor:
    """(N, K, C) -> (G, K, C): sum of each group's samples."""
    if ctx is None:
        return per_sample.sum(0, keepdim=True)
    return per_sample.new_zeros(groups, *per_sample.shape[1:]).index_add_(0, ctx, per_sample)


def _logit_reductions(dl: Tensor, d: Tensor, ctx: Tensor | None, groups: int) -> list[Tensor]:
    return [_group_sum((dl * d**i).sum(-1), ctx, groups) for i in range(3)]


def stats(x: Tensor, ctx: Tensor | None, mu: Tensor, h: Tensor, lc: Tensor, shift: Tensor) -> Tensor:
    """Shifted sums S (3, K, C) of the responsibilities over all positions."""
    if _uses_kernel(x, mu):
        S = x.new_zeros(3, *mu.shape)
        _run("mix_stats", x, ctx, mu, h, lc, red=S, shift=shift)
        return S
    tau, _ = _responsibilities(x, ctx, mu, h, lc)
    xt = (x - shift.view(1, -1, 1)).unsqueeze(1)
    return torch.stack([tau.sum((0, 3)), (tau * xt).sum((0, 3)), (tau * xt * xt).sum((0, 3))])


def apply(x: Tensor, ctx: Tensor | None, mu: Tensor, h: Tensor, lc: Tensor,
          alpha: Tensor, A: Tensor, beta: Tensor) -> Tensor:
    """y = beta + sum_k tau_k A[g, k] (x - alpha_k), shape of x."""
    if _uses_kernel(x, mu):
        y = torch.empty_like(x)
        _run("mix_apply", x, ctx, mu, h, lc, out=y, alpha=alpha, A=A, beta=beta)
        return y
    tau, _ = _responsibilities(x, ctx, mu, h, lc)
    scale = (A[ctx] if ctx is not None else A.expand(x.shape[0], -1, -1)).unsqueeze(-1)
    return beta.view(1, -1, 1) + (tau * scale * (x.unsqueeze(1) - alpha.unsqueeze(-1))).sum(1)


def apply_backward(gy: Tensor, x: Tensor, ctx: Tensor | None, mu: Tensor, h: Tensor, lc: Tensor,
                   alpha: Tensor, A: Tensor, need_param_grads: bool) -> tuple[Tensor, Tensor]:
    """Input gradient and reductions (5, G, K, C): sum g tau, sum g tau (x - alpha),
    and sum dl * (x - mu)^i for i = 0, 1, 2 with dl the gradient of the logits."""
    G = lc.shape[0]
    if _uses_kernel(x, mu):
        dx = torch.empty_like(x)
        red = x.new_zeros(5, G, *mu.shape)
        _run("mix_apply_backward", x, ctx, mu, h, lc, out=dx, red=red, grad=gy, alpha=alpha, A=A,
             need_param_grads=need_param_grads)
        return dx, red
    tau, d = _responsibilities(x, ctx, mu, h, lc)
    scale = (A[ctx] if ctx is not None else A.expand(x.shape[0], -1, -1)).unsqueeze(-1)
    centred = x.unsqueeze(1) - alpha.unsqueeze(-1)
    u = scale * centred
    gt = gy.unsqueeze(1) * tau
    dl = gt * (u - (tau * u).sum(1, keepdim=True))
    dx = (gt * scale).sum(1) - 2 * (dl * h.unsqueeze(-1) * d).sum(1)
    red = [_group_sum(gt.sum(-1), ctx, G), _group_sum((gt * centred).sum(-1), ctx, G),
           *_logit_reductions(dl, d, ctx, G)]
    return dx, torch.stack(red)


def stats_backward(dS: Tensor, x: Tensor, ctx: Tensor | None, mu: Tensor, h: Tensor, lc: Tensor,
                   shift: Tensor, need_param_grads: bool, dx: Tensor) -> Tensor:
    """Add the input gradient to ``dx`` in place; return the reductions (3, G, K, C) of
    sum dl * (x - mu)^i, given dS (3, K, C)."""
    G = lc.shape[0]
    if _uses_kernel(x, mu):
        red = x.new_zeros(3, G, *mu.shape)
        _run("mix_stats_backward", x, ctx, mu, h, lc, out=dx, red=red, shift=shift, dS=dS,
             need_param_grads=need_param_grads)
        return red
    tau, d = _responsibilities(x, ctx, mu, h, lc)
    xt = (x - shift.view(1, -1, 1)).unsqueeze(1)
    d0, d1, d2 = (t.unsqueeze(-1) for t in dS)
    e = d0 + (d1 + d2 * xt) * xt
    dl = tau * (e - (tau * e).sum(1, keepdim=True))
    dx += (tau * (d1 + 2 * d2 * xt)).sum(1) - 2 * (dl * h.unsqueeze(-1) * d).sum(1)
    return torch.stack(_logit_reductions(dl, d, ctx, G))
