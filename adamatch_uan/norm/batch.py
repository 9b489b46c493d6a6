"""BatchNorm as torch implements it, for inputs of any rank (docs/METHOD.md §1)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from adamatch_uan.norm.mixture import Mixture, mixture_normalize
from adamatch_uan.norm.sync import distributed


class BatchNorm(_BatchNorm):
    """torch's BatchNorm, choosing 1d/2d/3d behaviour from the input rank at call time.

    It is ``torch.nn.BatchNorm{1,2,3}d`` (same parameters, buffers, kernels and
    ``SyncBatchNorm`` conversion) with only the input-rank check relaxed, so a backbone can
    build it before it knows where it sits.

    Shape:
        x: (N, C) or (N, C, *spatial).
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"Expected input of shape (N, C, *spatial), got {tuple(input.shape)}")


class SyncedBatchNorm(BatchNorm):
    """BatchNorm whose training statistics are those of every process of ``process_group``.

    The class ``norm.sync.sync_norms`` gives a model's BatchNorm layers in place (their
    parameters, buffers and state-dict keys stay as they are). On CUDA it is torch's
    ``SyncBatchNorm``; on other devices (gloo, CPU), where torch's raises, it is the mixture
    transform with K = 1, which is BatchNorm's (docs/METHOD.md §2 with τ = 1: α = mean,
    δ² = biased variance, running variance updated with the unbiased global variance), with
    the sums all-reduced (``norm.sync``). Outside training, without a process group of more
    than one process, or with ``sync_stats`` False, it is plain BatchNorm.
    """

    sync_stats: bool = True
    process_group = None
    # SyncBatchNorm.forward, borrowed on CUDA, calls this SyncBatchNorm-only check.
    _check_non_zero_input_channels = nn.SyncBatchNorm._check_non_zero_input_channels

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and self.sync_stats and distributed(self.process_group)):
            return super().forward(input)
        if input.is_cuda:
            return nn.SyncBatchNorm.forward(self, input)
        self._check_input_dim(input)
        if self.track_running_stats and self.momentum is None:
            raise ValueError("Synced BatchNorm on CPU needs an exponential running average; got momentum=None")
        c = input.shape[1]
        tables = dict(dtype=torch.float32 if input.dtype != torch.float64 else input.dtype, device=input.device)
        single = Mixture(torch.zeros(1, 1, c, **tables), torch.zeros(1, c, **tables), torch.ones(1, c, **tables))
        running = None
        if self.track_running_stats:
            running = (self.running_mean.view(1, c), self.running_var.view(1, c), self.momentum)
            self.num_batches_tracked.add_(1)
        y, _ = mixture_normalize(input, single, self.weight, self.bias, self.eps, running=running, batch_stats=False,
                                 sync=True, group=self.process_group)
        return y
