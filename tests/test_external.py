"""torchvision (and timm) backbones by name, with any norm, in a method."""

import pytest
import torch

from adamatch_uan.methods import AdaMatch
from adamatch_uan.models import make_backbone
from adamatch_uan.norm import UAN


def test_a_torchvision_backbone_by_name_with_uan_and_a_context():
    model = make_backbone("torchvision:resnet18", 10, norm="uan_ctx", weights=None)
    assert sum(isinstance(m, UAN) for m in model.modules()) == 20
    y = model(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    assert y.shape == (2, 10)


def test_a_method_trains_a_torchvision_backbone():
    method = AdaMatch(backbone="torchvision:resnet18", norm="uan", backbone_options={"weights": None})
    method.train()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    source, target = method.views(images), method.views(images)
    logits, target_logits, _ = method.forward_passes(source, target)
    logits.sum().backward()
    assert target_logits.shape == (4, 10)


def test_bad_external_specs_are_clear_errors():
    with pytest.raises(ValueError, match="torchvision model 'resnet1000'"):
        make_backbone("torchvision:resnet1000", 10, norm="uan")
    with pytest.raises(ValueError, match="built-in backbone"):
        make_backbone("torchvision:resnet18", 10, norm={"input": "uan"})
    with pytest.raises(ValueError, match="torchvision:NAME"):
        make_backbone("resnet50")
