"""Backbones that take any norm layer: ``make_backbone(name, num_classes, norm=..., norm_at=...)``.

Models know nothing about AdaMatch: they take ``forward(x, context=None)`` and pass the
context to the norm layers that read one. torchvision and timm models join by name
(``torchvision:resnet18``), their BatchNorm layers converted to the chosen norm.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from adamatch_uan.models.external import PREFIXES, external_backbone
from adamatch_uan.models.shallow_cnn import ShallowCNN
from adamatch_uan.models.slots import NormSlot
from adamatch_uan.models.wide_resnet import WideResNet

BACKBONES: dict[str, Callable[..., nn.Module]] = {"shallow_cnn": ShallowCNN, "wide_resnet": WideResNet}


def list_backbones() -> list[str]:
    """The registered backbone names."""
    return sorted(BACKBONES)


def make_backbone(name: str, num_classes: int = 10, **options) -> nn.Module:
    """Build a backbone by name, or ``torchvision:NAME`` / ``timm:NAME`` (``external_backbone``);
    ``options`` go to its constructor (norm, norm_at, norm_options, ...).

    Raises:
        ValueError: for an unknown name, listing the choices.
    """
    if name.startswith(PREFIXES):
        return external_backbone(name, num_classes, **options)
    if name not in BACKBONES:
        raise ValueError(f"Expected a backbone in {{{', '.join(list_backbones())}}} or torchvision:NAME, timm:NAME, "
                         f"got {name!r}; use --model.init_args.backbone NAME")
    return BACKBONES[name](num_classes=num_classes, **options)


__all__ = ["BACKBONES", "NormSlot", "ShallowCNN", "WideResNet", "external_backbone", "list_backbones", "make_backbone"]
