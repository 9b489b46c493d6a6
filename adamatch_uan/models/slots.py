"""Where norm layers go in a backbone, which norm each slot gets, and how the context reaches them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from adamatch_uan.norm import NormFactory, make_norm, uses_context

NormAt = str | Sequence[str]
# dict rather than Mapping: jsonargparse parses and serialises dict (YAML, --print_config).
NormSpec = str | dict | NormFactory
"""A norm name or callable (``make_norm``), or a mapping ``{"norm": name, **options}`` with
options for that slot alone (e.g. ``{"norm": "uan_ctx", "num_components": 2}``)."""
NormChoice = str | dict | NormFactory
"""One ``NormSpec`` for every chosen slot, or a mapping slot name → ``NormSpec`` in which
``"default"`` is the spec of the chosen slots (``norm_at``) not named:
``{"input": "uan_ctx", "default": "bn"}`` is UAN with the domain as context on the input
image and BatchNorm in every other slot (the authors' layout)."""
DEFAULT = "default"


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


def _is_slot_mapping(norm: NormChoice) -> bool:
    return isinstance(norm, Mapping) and "norm" not in norm


class SlotBuilder:
    """Builds the norm slots of one backbone from (norm, norm_at, options), resolved once.

    Args:
        slots: every slot name the backbone offers, in order; "input" is the input image.
        norm: a ``NormChoice``: one spec for every chosen slot, or a slot → spec mapping.
        norm_at: the slots that get the norm (or a mapping's "default"): "all" (every slot
            but "input"), "input", "none", or a list of slot names. Slots a mapping names
            get their norm whatever ``norm_at`` says.
        options: keyword options for every norm layer built (a slot's own options win).

    Raises:
        ValueError: naming unknown slots, norms or options, with the valid choices.
    """

    def __init__(self, slots: Sequence[str], norm: NormChoice, norm_at: NormAt, options: dict) -> None:
        if isinstance(norm_at, str):
            chosen = {"all": [s for s in slots if s != "input"], "input": ["input"], "none": []}.get(norm_at)
            if chosen is None:
                raise ValueError(f"Expected norm_at 'all', 'input', 'none' or a list of slots from "
                                 f"{list(slots)}, got {norm_at!r}; use --model.init_args.norm_at")
        else:
            chosen = list(norm_at)
            unknown = [s for s in chosen if s not in slots]
            if unknown:
                raise ValueError(f"Unknown norm slots {unknown}; expected names from {list(slots)}; "
                                 f"use --model.init_args.norm_at")
        if _is_slot_mapping(norm):
            unknown = [s for s in norm if s != DEFAULT and s not in slots]
            if unknown:
                raise ValueError(f"Unknown norm slots {unknown} in the norm mapping; expected names from "
                                 f"{[DEFAULT, *slots]}; use --model.init_args.norm")
            default = norm.get(DEFAULT)
            self.plan = {s: default for s in chosen} if default is not None else {}
            self.plan.update({s: spec for s, spec in norm.items() if s != DEFAULT})
        else:
            self.plan = dict.fromkeys(chosen, norm)
        self.options = dict(options)
        checked = set()
        for slot, spec in self.plan.items():  # fail now, once per distinct spec, on a bad name or option
            if repr(spec) not in checked:
                self._layer(slot, spec, 1)
                checked.add(repr(spec))

    def _layer(self, slot: str, spec: NormSpec, channels: int) -> nn.Module:
        options = self.options
        if isinstance(spec, Mapping):
            options = {**options, **{k: v for k, v in spec.items() if k != "norm"}}
            spec = spec["norm"]
        try:
            return make_norm(spec, channels, **options)
        except ValueError as error:
            raise ValueError(f"In norm slot {slot!r}: {error}") from error
        except TypeError as error:
            raise ValueError(f"Expected options that norm {spec!r} accepts in slot {slot!r}, got {sorted(options)} "
                             f"({error}); give that slot its own options, e.g. "
                             f"--model.init_args.norm '{{\"{slot}\": {{\"norm\": \"{spec}\", ...}}}}'") from error

    def __call__(self, name: str, channels: int) -> NormSlot:
        spec = self.plan.get(name)
        return NormSlot(self._layer(name, spec, channels) if spec is not None else nn.Identity())


def describe(norm: NormChoice) -> str:
    """A short name for a norm choice (run directories): "uan", or "input=uan_ctx,default=bn"."""
    def one(spec: NormSpec) -> str:
        spec = spec["norm"] if isinstance(spec, Mapping) else spec
        return spec if isinstance(spec, str) else getattr(spec, "__name__", type(spec).__name__)

    if _is_slot_mapping(norm):
        return ",".join(f"{slot}={one(spec)}" for slot, spec in norm.items())
    return one(norm)
