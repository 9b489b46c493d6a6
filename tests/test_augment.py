import pytest
import torch

from adamatch_uan.augment import Augment, to_model_input, to_unit


@pytest.fixture
def images():
    return torch.rand(16, 3, 32, 32)


def test_views_keep_shape_dtype_and_range(images):
    augment = Augment()
    for view in (augment.weak(images), augment.strong(images)):
        assert view.shape == images.shape and view.dtype == images.dtype
        assert view.min() >= 0 and view.max() <= 1


def test_weak_is_not_identity_and_strong_is_not_weak(images):
    augment = Augment()
    torch.manual_seed(1)
    weak = augment.weak(images)
    torch.manual_seed(1)
    strong = augment.strong(images)
    assert not torch.equal(weak, images)
    assert not torch.equal(strong, weak)


def test_same_seed_same_views(images):
    augment = Augment()
    views = []
    for _ in range(2):
        torch.manual_seed(7)
        views.append((augment.weak(images), augment.strong(images)))
    assert all(torch.equal(a, b) for a, b in zip(*views))


def test_weak_view_is_a_shift_of_at_most_four_pixels():
    augment = Augment(cutout=0)
    image = torch.zeros(1, 1, 32, 32)
    image[0, 0, 16, 16] = 1.0
    for _ in range(20):
        y, x = divmod(int(augment.weak(image).flatten().argmax()), 32)
        assert abs(y - 16) <= 4 and abs(x - 16) <= 4


def test_strong_ops_are_chosen_per_image(monkeypatch):
    augment = Augment()
    used = []
    for name, op in augment.ops.items():
        original = op.forward
        monkeypatch.setattr(op, "forward", lambda x, *a, _n=name, _f=original, **k: used.append(_n) or _f(x, *a, **k))
    augment.strong(torch.rand(64, 3, 32, 32))
    # kornia's RandAugment would apply num_ops = 2 ops to the whole batch.
    assert len(set(used)) > 2


def test_flip_is_optional():
    assert not any("Flip" in type(m).__name__ for m in Augment().weak_ops)
    assert any("Flip" in type(m).__name__ for m in Augment(flip=True).weak_ops)


def test_scaling_matches_the_official_recipe():
    pixels = torch.tensor([0, 127, 255], dtype=torch.uint8).view(1, 1, 1, 3)
    expected = (pixels.float() - 127.5) / 128
    torch.testing.assert_close(to_model_input(to_unit(pixels)), expected)
