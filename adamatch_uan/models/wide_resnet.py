"""WRN-28-2 as in the official AdaMatch code (pre-activation blocks, leaky-ReLU 0.1)."""

from __future__ import annotations

from torch import Tensor, nn

from adamatch_uan.models.slots import NormAt, NormChoice, NormSlot, SlotBuilder


def _act(x: Tensor) -> Tensor:
    return nn.functional.leaky_relu(x, 0.1)


class Block(nn.Module):
    """y = shortcut(x or act(norm1(x))) + conv2(act(norm2(conv1(act(norm1(x))))))."""

    def __init__(self, slot: SlotBuilder, name: str, nin: int, nout: int, stride: int,
                 activate_before_residual: bool) -> None:
        super().__init__()
        self.norm1: NormSlot = slot(f"{name}.norm1", nin)
        self.conv1 = nn.Conv2d(nin, nout, 3, stride=stride, padding=1, bias=False)
        self.norm2: NormSlot = slot(f"{name}.norm2", nout)
        self.conv2 = nn.Conv2d(nout, nout, 3, padding=1, bias=False)
        self.shortcut = nn.Conv2d(nin, nout, 1, stride=stride, bias=False) if nin != nout else None
        self.activate_before_residual = activate_before_residual

    def forward(self, x: Tensor, context: Tensor | None) -> Tensor:
        y = _act(self.norm1(x, context))
        if self.activate_before_residual:
            x = y
        if self.shortcut is not None:
            x = self.shortcut(x)
        return x + self.conv2(_act(self.norm2(self.conv1(y), context)))


def slot_names(scales: int = 3, repeat: int = 4) -> list[str]:
    """Norm slots in order: "input", "blocks.{i}.norm1/2", "norm_out"."""
    return ["input"] + [f"blocks.{i}.norm{j}" for i in range(scales * repeat) for j in (1, 2)] + ["norm_out"]


class WideResNet(nn.Module):
    """Wide ResNet; WRN-28-2 by default (3 scales × 4 blocks, 32 filters doubling per scale).

    Norm layers get ``momentum=0.001`` unless ``norm_options`` says otherwise (the official
    BN momentum 0.999 in TensorFlow terms). Convolutions use He initialisation on fan-out,
    the classifier Xavier, as the official code.

    Args:
        num_classes: outputs.
        norm: anything ``make_norm`` accepts, or a slot → norm mapping (``slots.NormChoice``),
            e.g. ``{"input": "uan_ctx", "default": "bn"}``.
        norm_at: "all", "input", "none", or a list of names from ``slot_names()``: where the
            norm (a mapping's "default") goes.
        norm_options: options for every norm layer.
        filters: width of the first scale.
        scales: number of scales (stride 2 between them).
        repeat: blocks per scale.
        in_channels: input channels.

    Shape:
        x: (N, in_channels, H, W); context: (N,) ints or None; output (N, num_classes).
    """

    def __init__(self, num_classes: int = 10, norm: NormChoice = "bn", norm_at: NormAt = "all",
                 norm_options: dict | None = None, filters: int = 32, scales: int = 3, repeat: int = 4,
                 in_channels: int = 3) -> None:
        super().__init__()
        slot = SlotBuilder(slot_names(scales, repeat), norm, norm_at, {"momentum": 0.001, **(norm_options or {})})
        self.input = slot("input", in_channels)
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        blocks, n = [], 16
        for scale in range(scales):
            last, n = n, filters << scale
            for r in range(repeat):
                blocks.append(Block(slot, f"blocks.{len(blocks)}", last if r == 0 else n, n,
                                    stride=2 if scale and r == 0 else 1, activate_before_residual=scale == 0 and r == 0))
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = slot("norm_out", n)
        self.head = nn.Linear(n, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu", a=0.1)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        x = self.stem(self.input(x, context))
        for block in self.blocks:
            x = block(x, context)
        x = _act(self.norm_out(x, context))
        return self.head(x.mean((2, 3)))
