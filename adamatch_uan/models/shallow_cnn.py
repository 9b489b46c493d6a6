"""The seed's shallow CNN for 3×32×32 digits."""

from __future__ import annotations

from torch import Tensor, nn

from adamatch_uan.models.slots import NormAt, NormChoice, SlotBuilder

SLOTS = ("input", "norm1", "norm2", "norm3", "norm4")


class ShallowCNN(nn.Module):
    """conv5×5(64)+norm+relu, maxpool 3/2; conv5×5(128)+norm+relu, maxpool 3/2;
    conv5×5(128)+norm+relu, maxpool 3/2; conv3×3(256)+norm+relu, avgpool 4; linear.

    Convolutions and pools are padded so 32 → 16 → 8 → 4 → 1.

    Args:
        num_classes: outputs.
        norm: anything ``make_norm`` accepts, or a slot → norm mapping (``slots.NormChoice``),
            e.g. ``{"input": "uan_ctx", "default": "bn"}``.
        norm_at: "all" (norm1..norm4), "input" (a norm on the input image), "none", or a
            list of slot names from ``SLOTS``: where the norm (a mapping's "default") goes.
        norm_options: options for every norm layer.
        in_channels: input channels.

    Shape:
        x: (N, in_channels, 32, 32); context: (N,) ints or None; output (N, num_classes).
    """

    def __init__(self, num_classes: int = 10, norm: NormChoice = "bn", norm_at: NormAt = "all",
                 norm_options: dict | None = None, in_channels: int = 3) -> None:
        super().__init__()
        slot = SlotBuilder(SLOTS, norm, norm_at, norm_options or {})
        self.input = slot("input", in_channels)
        widths = [(in_channels, 64, 5), (64, 128, 5), (128, 128, 5), (128, 256, 3)]
        self.convs = nn.ModuleList(nn.Conv2d(i, o, k, padding=k // 2) for i, o, k in widths)
        self.norms = nn.ModuleList(slot(f"norm{i + 1}", o) for i, (_, o, _) in enumerate(widths))
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.head = nn.Linear(256, num_classes)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        x = self.input(x, context)
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            x = norm(conv(x), context).relu()
            x = self.pool(x) if i < 3 else nn.functional.adaptive_avg_pool2d(x, 1)
        return self.head(x.flatten(1))
