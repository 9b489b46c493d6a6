"""Backbones from torchvision and timm by name, their BatchNorm layers converted to the chosen norm."""

from __future__ import annotations

import importlib.util

from torch import nn

from adamatch_uan.norm import NormFactory, WithContext, convert_norms

PREFIXES = ("torchvision:", "timm:")


def external_backbone(spec: str, num_classes: int = 10, norm: str | NormFactory = "bn", norm_at: str = "all",
                      norm_options: dict | None = None, **model_options) -> nn.Module:
    """``torchvision:NAME`` (``torchvision.models.get_model``) or ``timm:NAME`` (``timm.create_model``,
    timm being optional) with ``num_classes`` outputs and ``model_options`` passed through (e.g.
    ``weights`` for torchvision, ``pretrained`` for timm; never downloaded unless asked). Every
    BatchNorm becomes ``norm`` (``convert_norms``; "bn" keeps them), and the model takes
    ``forward(x, context=None)`` (``WithContext``).

    Raises:
        ValueError: an unknown prefix or model name, timm missing, or a per-slot norm mapping
            (slots are the built-in backbones').
    """
    kind, _, name = spec.partition(":")
    if isinstance(norm, dict) or norm_at != "all":
        raise ValueError(f"Expected one norm for every BatchNorm of {spec}, got norm={norm!r}, norm_at={norm_at!r}; "
                         f"a norm per slot needs a built-in backbone (--model.init_args.backbone shallow_cnn)")
    if kind == "torchvision":
        import torchvision

        try:
            model = torchvision.models.get_model(name, num_classes=num_classes, **model_options)
        except ValueError as error:
            raise ValueError(f"Unknown torchvision model {name!r} ({error}); see torchvision.models.list_models()") from error
    elif kind == "timm":
        if importlib.util.find_spec("timm") is None:
            raise ValueError(f"Expected timm for {spec}; install it with `pip install timm`")
        import timm

        model = timm.create_model(name, num_classes=num_classes, **model_options)
    else:
        raise ValueError(f"Expected a backbone prefix in {PREFIXES}, got {spec!r}")
    if norm != "bn":
        convert_norms(model, norm, **(norm_options or {}))
    return WithContext(model)
