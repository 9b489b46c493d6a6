"""AdaBN: running statistics re-estimated on unlabelled images, on a copy, nothing else changed."""

import copy

import pytest
import torch
from torch import nn

from adamatch_uan.norm import BatchNorm, make_norm, recalibrated


class Net(nn.Module):
    """conv → norm → ReLU, the context passed to a context-aware norm, as backbones do."""

    def __init__(self, norm):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 6, 3), make_norm(norm, 6)
        self.takes_context = norm.endswith("ctx")

    def forward(self, x, context=None):
        h = self.conv(x)
        return (self.norm(h, context) if self.takes_context else self.norm(h)).relu()


def trained(norm):
    torch.manual_seed(0)
    model = Net(norm)
    for _ in range(3):  # running statistics of a "source"
        model(torch.randn(8, 3, 8, 8), torch.zeros(8, dtype=torch.long))
    return model.eval()


def target_batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 3, 8, 8, generator=g) * 2 + 3 for _ in range(3)]


@pytest.mark.parametrize("norm", ["bn", "mn", "uan", "uan_ctx", "bn_ctx"])
def test_the_model_is_untouched_and_only_running_statistics_change(norm):
    model = trained(norm)
    before = copy.deepcopy(model.state_dict())
    new = recalibrated(model, target_batches(), context=1 if norm.endswith("ctx") else None)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model given
    assert not new.training
    for name, value in new.named_parameters():
        assert torch.equal(value, dict(model.named_parameters())[name]), name
    changed = [name for name, value in new.named_buffers() if not torch.equal(value, dict(model.named_buffers())[name])]
    assert any("running" in name for name in changed), changed


def test_for_batchnorm_the_statistics_are_those_of_the_target_images():
    model = nn.Sequential(BatchNorm(3, momentum=0.1))
    model(torch.randn(16, 3, 4, 4))  # source statistics
    batches = target_batches()
    new = recalibrated(model.eval(), batches)
    layer = new[0]
    images = torch.cat(batches)
    torch.testing.assert_close(layer.running_mean, images.mean((0, 2, 3)))  # equal batches: the mean of all
    torch.testing.assert_close(layer.running_var, torch.stack([b.var((0, 2, 3)) for b in batches]).mean(0))
    assert layer.momentum == 0.1  # restored


def test_uan_with_one_component_recalibrates_as_batchnorm():
    bn, uan = trained("bn"), trained("bn")
    uan.norm = make_norm("uan", 6, num_components=1)
    a, b = recalibrated(bn, target_batches()).norm, recalibrated(uan, target_batches()).norm
    torch.testing.assert_close(b.running_mean[0], a.running_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.running_var[0], a.running_var, rtol=1e-4, atol=1e-5)
