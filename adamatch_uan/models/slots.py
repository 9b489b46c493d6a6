"""Where norm layers go in a backbone, and how the context reaches them."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from adamatch_uan.norm import NormFactory, make_norm, uses_context

NormAt = str | Sequence[str]


class NormSlot(nn.Module):
    """One place for a norm layer; forwards the context only if the layer reads one.

    Whether it does is decided once, at construction, from ``uses_context(layer)``.
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.takes_context = uses_context(layer)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return self.layer(x, context) if self.takes_context else self.layer(x)


class SlotBuilder:
    """Builds the norm slots of one backbone from (norm, norm_at, options), resolved once.

    Args:
        slots: every slot name the backbone offers, in order; "input" is the input image.
        norm: anything ``make_norm`` accepts.
        norm_at: "all" (every slot but "input"), "input", "none", or a list of slot names.
        options: keyword options for every norm layer built.

    Raises:
        ValueError: naming unknown slots and listing the valid ones.
    """

    def __init__(self, slots: Sequence[str], norm: str | NormFactory, norm_at: NormAt, options: dict) -> None:
        if isinstance(norm_at, str):
            chosen = {"all": [s for s in slots if s != "input"], "input": ["input"], "none": []}.get(norm_at)
            if chosen is None:
                raise ValueError(f"Expected norm_at 'all', 'input', 'none' or a list of slots from "
                                 f"{list(slots)}, got {norm_at!r}; use --model.norm_at")
        else:
            chosen = list(norm_at)
            unknown = [s for s in chosen if s not in slots]
            if unknown:
                raise ValueError(f"Unknown norm slots {unknown}; expected names from {list(slots)}; use --model.norm_at")
        self.chosen = set(chosen)
        self.norm, self.options = norm, dict(options)
        make_norm(norm, 1, **self.options) if self.chosen else None  # fail now on a bad name or option

    def __call__(self, name: str, channels: int) -> NormSlot:
        layer = make_norm(self.norm, channels, **self.options) if name in self.chosen else nn.Identity()
        return NormSlot(layer)
