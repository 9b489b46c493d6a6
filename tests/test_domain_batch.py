"""Per-domain BatchNorm (bn_ctx) and GroupNorm (gn)."""

import pytest
import torch
from torch import nn

from adamatch_uan.models import make_backbone
from adamatch_uan.models.shallow_cnn import SLOTS as SHALLOW_SLOTS
from adamatch_uan.models.wide_resnet import slot_names
from adamatch_uan.norm import DomainBatchNorm, group_norm, make_norm


def twins(affine_per_context=False):
    torch.manual_seed(0)
    layer = DomainBatchNorm(5, num_contexts=1, momentum=0.3, affine_per_context=affine_per_context)
    reference = nn.BatchNorm2d(5, momentum=0.3)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(1, 5)), layer.bias.copy_(torch.randn(1, 5))
        reference.weight.copy_(layer.weight[0]), reference.bias.copy_(layer.bias[0])
    return layer, reference


def test_one_context_is_batchnorm_exactly_in_training_and_evaluation():
    layer, reference = twins()
    for _ in range(3):
        x = torch.randn(8, 5, 4, 4) * 3 + 1
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = layer(xa, torch.zeros(8, dtype=torch.long)), reference(xb)
        assert torch.equal(ya, yb)
        ya.square().sum().backward(), yb.square().sum().backward()
        assert torch.equal(xa.grad, xb.grad) and torch.equal(layer.weight.grad[0], reference.weight.grad)
    assert torch.equal(layer.running_mean[0], reference.running_mean)
    assert torch.equal(layer.running_var[0], reference.running_var)
    layer.eval(), reference.eval()
    x = torch.randn(6, 5, 4, 4)
    assert torch.equal(layer(x), reference(x))


def test_with_two_contexts_each_domain_gets_its_own_batch_statistics():
    torch.manual_seed(0)
    layer = DomainBatchNorm(3, num_contexts=2, momentum=1.0)
    source, target = torch.randn(4, 3, 5, 5), torch.randn(6, 3, 5, 5) * 4 + 2
    context = torch.tensor([1, 0, 1, 0, 1, 1, 0, 1, 0, 1])  # the domains interleaved
    x = torch.empty(10, 3, 5, 5)
    x[context == 0], x[context == 1] = source, target
    y = layer(x, context)
    alone = nn.functional.batch_norm
    torch.testing.assert_close(y[context == 0], alone(source, None, None, training=True))
    torch.testing.assert_close(y[context == 1], alone(target, None, None, training=True))
    torch.testing.assert_close(layer.running_mean[0], source.mean((0, 2, 3)))  # momentum 1: this batch's
    torch.testing.assert_close(layer.running_mean[1], target.mean((0, 2, 3)))
    torch.testing.assert_close(layer.running_var[1], target.var((0, 2, 3)))
    layer.eval()  # evaluation: each sample with its context's running statistics
    torch.testing.assert_close(layer(target[:2], torch.tensor([1, 1])), alone(target[:2], layer.running_mean[1],
                                                                            layer.running_var[1]))
    torch.testing.assert_close(layer(target[:2], 0), alone(target[:2], layer.running_mean[0], layer.running_var[0]))


def test_gamma_and_beta_per_context_are_an_option():
    layer = DomainBatchNorm(3, num_contexts=2, affine_per_context=True)
    assert layer.weight.shape == (2, 3) and make_norm("bn_ctx", 3).weight.shape == (1, 3)
    with torch.no_grad():
        layer.bias[1].fill_(5.0)
    x = torch.randn(4, 3, 2, 2)
    assert torch.allclose(layer(x, torch.tensor([1, 1, 0, 0]))[:2].mean(), torch.tensor(5.0), atol=0.5)


def test_group_norm_takes_the_largest_divisor_of_the_channels():
    assert group_norm(64).num_groups == 32 and group_norm(3).num_groups == 3 and group_norm(48, 32).num_groups == 24
    assert isinstance(make_norm("gn", 16), nn.GroupNorm)


@pytest.mark.parametrize("backbone, slots", [("shallow_cnn", list(SHALLOW_SLOTS)), ("wide_resnet", slot_names())])
@pytest.mark.parametrize("norm", ["gn", "bn_ctx"])
def test_gn_and_bn_ctx_build_in_every_slot_of_both_backbones(backbone, slots, norm):
    model = make_backbone(backbone, 10, norm=norm, norm_at=slots)
    kind = nn.GroupNorm if norm == "gn" else DomainBatchNorm
    assert sum(isinstance(m, kind) for m in model.modules()) == len(slots)  # the input slot too
    logits = model(torch.randn(4, 3, 32, 32), torch.tensor([0, 0, 1, 1]))
    assert logits.shape == (4, 10) and torch.isfinite(logits).all()
