import pytest
import torch
from torch import nn

from adamatch_uan.norm import BatchNorm


@pytest.mark.parametrize("shape, reference", [((8, 4), nn.BatchNorm1d), ((8, 4, 5), nn.BatchNorm1d),
                                              ((8, 4, 3, 3), nn.BatchNorm2d), ((8, 4, 2, 3, 3), nn.BatchNorm3d)])
def test_matches_the_torch_layer_of_the_input_rank(shape, reference):
    ours, theirs = BatchNorm(4, momentum=0.001), reference(4, momentum=0.001)
    x = torch.randn(shape)
    for mode in (True, False):
        ours.train(mode), theirs.train(mode)
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=0, atol=0)


def test_is_a_torch_batchnorm():
    layer = BatchNorm(4)
    assert isinstance(layer, nn.modules.batchnorm._BatchNorm)
    assert isinstance(nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(layer))[0], nn.SyncBatchNorm)
    with pytest.raises(ValueError, match="Expected input of shape"):
        layer(torch.randn(4))
