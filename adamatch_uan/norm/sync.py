"""Mixture statistics across processes (DDP): N processes × B samples normalize as one process with N·B.

The transform's batch statistics come from three per-(k, c) sums (docs/METHOD.md §2), so, as
torch's SyncBatchNorm does with its moments, a synced layer all-reduces them: each process
computes its sums (``backends.sums``) about a shift common to all processes, ``AllReduceSum``
adds them (and, backward, adds every process's gradient of them), and the transform runs with
the global α, δ² as given statistics. A process with an empty batch joins every collective with
zeros. The sampled quantities of the layers (the channel's variance for ``var_floor``, UAN's
component shares, MN's EM sums) are all-reduced with ``all_reduce`` the same way.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd import Function


def distributed(group=None) -> bool:
    """Whether a process group of more than one process is there to sync over."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def all_reduce(tensor: Tensor, group=None) -> Tensor:
    """The sum of ``tensor`` over the processes of ``group`` (a new tensor; no gradient)."""
    total = tensor.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total


class AllReduceSum(Function):
    """y = Σ_processes x; backward: dL/dx = Σ_processes dL/dy (every process's loss depends on
    every process's x through y), the gradient DDP's average over processes expects."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return all_reduce(grad.contiguous(), ctx.group), None


def common_shift(shift: Tensor, present: bool, group=None) -> Tensor:
    """The mean over processes with data of their per-channel shifts (C,): the same on every process."""
    packed = torch.cat([shift.detach() * float(present), shift.new_tensor([float(present)])])
    total = all_reduce(packed, group)
    return total[:-1] / total[-1].clamp_min(1)


def reshift(sums: Tensor, shift: Tensor, common: Tensor) -> Tensor:
    """Sums about ``shift`` → about ``common``: with d = shift − common, Σ τ(x − c) = S1 + d S0 and
    Σ τ(x − c)² = S2 + 2 d S1 + d² S0 (differentiable)."""
    d = (shift - common).view(1, -1)
    return torch.stack([sums[0], sums[1] + d * sums[0], sums[2] + 2 * d * sums[1] + d * d * sums[0]])


def global_statistics(sums: Tensor, shift: Tensor, present: bool, group=None) -> tuple[Tensor, Tensor, Tensor]:
    """(S0, α, δ²), each (K, C), of all processes' data from this process's sums about ``shift``;
    α and δ² differentiable (through the all-reduce) with the kernel's guards: S0 floored at
    sqrt(tiny), δ² at 0."""
    common = common_shift(shift, present, group)
    total = AllReduceSum.apply(reshift(sums, shift, common), group)
    safe = total[0].clamp_min(torch.finfo(total.dtype).tiny ** 0.5)
    m1, m2 = total[1] / safe, total[2] / safe
    return total[0].detach(), common.view(1, -1) + m1, (m2 - m1 * m1).clamp_min(0)


def channel_moments(values: Tensor, group=None) -> tuple[Tensor, Tensor]:
    """Mean and (biased) variance per channel of every process's sampled values (S, C)."""
    v = values.detach().to(torch.promote_types(values.dtype, torch.float32))
    packed = torch.cat([v.new_tensor([float(len(v))]), v.sum(0), (v * v).sum(0)])
    total = all_reduce(packed, group) if distributed(group) else packed
    n = total[0].clamp_min(1)
    mean = total[1:1 + v.shape[1]] / n
    return mean, (total[1 + v.shape[1]:] / n - mean * mean).clamp_min(0)
