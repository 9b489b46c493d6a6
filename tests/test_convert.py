"""convert_norms puts MN or UAN into any model; WithContext gives its context-aware layers a context per call."""

import copy

import pytest
import torch
import torchvision
from torch import nn

from adamatch_uan.methods.base import optimizer_groups
from adamatch_uan.norm import UAN, BatchNorm, MixtureNorm, WithContext, convert_norms, frozen_stats


def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10)  # random weights: nothing downloads


@pytest.mark.parametrize("norm", ["bn", "mn", "uan", "uan_ctx"])
def test_a_torchvision_resnet18_takes_every_norm(norm):
    model = WithContext(convert_norms(resnet18(), norm))
    expected = {"bn": BatchNorm, "mn": MixtureNorm, "uan": UAN, "uan_ctx": UAN}[norm]
    layers = [m for m in model.modules() if type(m) is expected]
    assert len(layers) == 20 and not any(type(m) is nn.BatchNorm2d for m in model.modules())  # every one converted
    x, context = torch.randn(4, 3, 32, 32), torch.tensor([0, 0, 1, 1])
    with frozen_stats(model):
        model(x, context)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with frozen_stats(model):
        model(x, context).sum().backward()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # frozen_stats held
    assert all(p.grad is not None for p in model.parameters())
    groups = optimizer_groups(model, 1e-3, lr=0.1)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))  # still a partition
    model.eval()
    assert torch.isfinite(model(x, context)).all()


def test_the_context_reaches_converted_layers_only_during_the_call():
    model = WithContext(convert_norms(resnet18(), "uan_ctx"))
    seen = []
    layer = next(m for m in model.modules() if isinstance(m, UAN))
    original = layer.forward
    layer.forward = lambda x, context=None: seen.append(context) or original(x, context)
    context = torch.tensor([1, 0])
    model(torch.randn(2, 3, 32, 32), context)
    assert seen[0] is context and all(getattr(m, "context", None) is None for m in model.modules())


def test_k1_uan_after_conversion_equals_the_original_batchnorm():
    original = resnet18()
    with torch.no_grad():  # non-trivial statistics and affine parameters to carry over
        for m in original.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
                m.weight.normal_()
                m.bias.normal_()
    converted = convert_norms(copy.deepcopy(original), "uan", num_components=1)
    x = torch.randn(8, 3, 32, 32)
    original.eval(), converted.eval()
    torch.testing.assert_close(converted(x), original(x), rtol=1e-4, atol=1e-4)  # evaluation: μ, σ² started at m, v
    original.train(), converted.train()
    torch.testing.assert_close(converted(x), original(x), rtol=1e-4, atol=1e-4)  # training mode: batch statistics


def test_nothing_to_convert_is_a_clear_error():
    with pytest.raises(ValueError, match="found none"):
        convert_norms(nn.Sequential(nn.Linear(3, 3)), "uan")
