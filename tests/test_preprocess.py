"""The image-size rule: digits padded at 32, other sizes resized with the centre kept, memory checked."""

import pytest
import torch

from adamatch_uan.data import DomainError
from adamatch_uan.data import preprocess
from adamatch_uan.data.preprocess import describe, resizer, to_rgb32, to_square


def test_digits_are_padded_at_32():
    x = torch.randint(1, 255, (2, 28, 28), dtype=torch.uint8)
    y = to_rgb32(x)
    assert y.shape == (2, 3, 32, 32) and torch.equal(y[:, 0, 2:30, 2:30], x) and y[:, :, :2].eq(0).all()
    assert to_rgb32(torch.zeros(2, 16, 16, dtype=torch.uint8)).shape == (2, 3, 32, 32)
    with pytest.raises(DomainError, match="channels"):
        to_rgb32(torch.zeros(2, 2, 32, 32, dtype=torch.uint8))


def test_other_sizes_keep_the_aspect_ratio_and_the_centre():
    x = torch.zeros(1, 3, 40, 80, dtype=torch.uint8)
    x[..., 20:60] = 255  # the centre square of the wide image
    y = to_square(x, 20)
    assert y.shape == (1, 3, 20, 20) and y.float().mean() > 250
    assert torch.equal(to_square(torch.full((2, 3, 64, 64), 7, dtype=torch.uint8), 64),
                       torch.full((2, 3, 64, 64), 7, dtype=torch.uint8))  # the run's own size is untouched
    assert resizer(224)[0](torch.zeros(1, 1, 300, 300, dtype=torch.uint8)).shape == (1, 3, 224, 224)
    assert "224×224" in describe(224) and "padded" in describe(32)


def test_a_set_larger_than_half_the_memory_is_refused(monkeypatch):
    monkeypatch.setattr(preprocess, "available_memory", lambda: 2**30)
    preprocess.check_memory(100, 224, 224, "photos")  # 15 MiB
    with pytest.raises(DomainError, match=r"photos: 50000 images of 224×224 need 7.0 GiB.*512.0 MiB"):
        preprocess.check_memory(50_000, 224, 224, "photos")
