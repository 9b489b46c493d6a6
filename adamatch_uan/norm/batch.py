"""BatchNorm as torch implements it, for inputs of any rank (docs/METHOD.md §1)."""

from __future__ import annotations

from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm


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
