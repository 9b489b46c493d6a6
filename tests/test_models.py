"""Both backbones with every norm: shapes, context threading, norm placement, registry."""

import pytest
import torch

from adamatch_uan.models import list_backbones, make_backbone
from adamatch_uan.models.wide_resnet import slot_names
from adamatch_uan.norm import UAN, BatchNorm, MixtureNorm

NORMS = ["bn", "mn", "uan", "uan_ctx", "none"]


@pytest.mark.parametrize("backbone", ["shallow_cnn", "wide_resnet"])
@pytest.mark.parametrize("norm", NORMS)
def test_forward_backward_with_every_norm(backbone, norm):
    model = make_backbone(backbone, 10, norm=norm)
    x = torch.randn(4, 3, 32, 32)
    y = model(x, torch.tensor([0, 0, 1, 1]))
    assert y.shape == (4, 10)
    y.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("backbone", ["shallow_cnn", "wide_resnet"])
def test_context_changes_output_only_for_context_norms(backbone):
    x = torch.randn(4, 3, 32, 32)
    for norm, changes in (("bn", False), ("uan_ctx", True)):
        model = make_backbone(backbone, 10, norm=norm).eval()
        for m in model.modules():
            if isinstance(m, UAN) and m.num_contexts:
                with torch.no_grad():
                    m.prior_logits[1].add_(torch.randn_like(m.prior_logits[1]))
        zeros, ones = torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long)
        differs = not torch.allclose(model(x, zeros), model(x, ones))
        assert differs == changes, norm


def test_norm_placement_and_wide_resnet_defaults():
    shallow = make_backbone("shallow_cnn", 10, norm="uan", norm_at="input")
    assert isinstance(shallow.input.layer, UAN) and not any(isinstance(n.layer, UAN) for n in shallow.norms)
    wrn = make_backbone("wide_resnet", 10, norm="bn")
    bns = [m for m in wrn.modules() if isinstance(m, BatchNorm)]
    assert len(bns) == len(slot_names()) - 1 and all(m.momentum == 0.001 for m in bns)
    assert sum(p.numel() for p in wrn.parameters()) == 1_467_610  # WRN-28-2
    partial = make_backbone("wide_resnet", 10, norm="mn", norm_at=["blocks.0.norm1", "norm_out"])
    assert sum(isinstance(m, MixtureNorm) for m in partial.modules()) == 2


def test_unknown_backbone_lists_choices():
    with pytest.raises(ValueError, match="shallow_cnn, wide_resnet.*torchvision:NAME"):
        make_backbone("resnet50")
    assert list_backbones() == ["shallow_cnn", "wide_resnet"]
