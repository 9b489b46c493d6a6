"""Weak and strong views of image batches with kornia, on the batch's device (docs/METHOD.md §5).

Images are float in [0, 1], shape (N, C, H, W); ``to_model_input`` maps them to the model's
scale, (255 x − 127.5) / 128. ``to_unit`` turns the uint8 batches the data modules give
into [0, 1].

- weak: random shift of up to ``shift`` px with reflect padding (kornia ``RandomCrop`` with
  padding), plus an optional horizontal flip (off by default: wrong for digits).
- strong: weak, then ``num_ops`` ops drawn per image from a RandAugment-style set (kornia's
  own classes, random magnitudes), then a ``cutout`` px square filled with grey (kornia
  ``RandomErasing`` at the matching area).

kornia's ``RandAugment`` draws its ops once per batch; FixMatch and AdaMatch draw them per
image. Here each image draws its own ops: every op is applied to the subset of images that
drew it, one op slot after the other. Randomness comes from torch's global generator, so
``torch.manual_seed`` makes the views reproducible.
"""

from __future__ import annotations

import kornia.augmentation as K
import torch
from torch import Tensor, nn


def to_unit(images: Tensor) -> Tensor:
    """uint8 (N, C, H, W) in [0, 255] → float in [0, 1]; float input is returned as is."""
    return images.float().div_(255) if images.dtype == torch.uint8 else images


def to_model_input(images: Tensor) -> Tensor:
    """[0, 1] images → the scale (x − 127.5) / 128 of x in [0, 255] (docs/METHOD.md §5)."""
    return (images * 255 - 127.5) / 128


def strong_ops() -> dict[str, nn.Module]:
    """The RandAugment-style op set, each a kornia augmentation applied with probability 1."""
    return {
        "identity": nn.Identity(),
        "autocontrast": K.RandomAutoContrast(p=1.0),
        "equalize": K.RandomEqualize(p=1.0),
        "rotate": K.RandomRotation(30.0, p=1.0),
        "solarize": K.RandomSolarize(thresholds=0.5, additions=0.0, p=1.0),
        "color": K.RandomSaturation((0.05, 1.95), p=1.0),
        "posterize": K.RandomPosterize(bits=(4, 8), p=1.0),
        "contrast": K.RandomContrast((0.05, 1.95), p=1.0),
        "brightness": K.RandomBrightness((0.05, 1.95), p=1.0),
        "sharpness": K.RandomSharpness(0.95, p=1.0),
        "shear_x": K.RandomShear((-17.0, 17.0, 0.0, 0.0), p=1.0),
        "shear_y": K.RandomShear((0.0, 0.0, -17.0, 17.0), p=1.0),
        "translate_x": K.RandomTranslate(translate_x=(-0.3, 0.3), translate_y=(0.0, 0.0), p=1.0),
        "translate_y": K.RandomTranslate(translate_x=(0.0, 0.0), translate_y=(-0.3, 0.3), p=1.0),
    }


class Augment(nn.Module):
    """Weak and strong views of a batch.

    Args:
        image_size: (H, W) of the images.
        shift: maximum shift in pixels of the weak view.
        flip: add a random horizontal flip to the weak view.
        num_ops: ops per image in the strong view.
        cutout: side in pixels of the strong view's cutout square (0: none).

    Shape:
        images: (N, C, H, W) float in [0, 1]; views have the same shape and dtype.
    """

    def __init__(self, image_size: tuple[int, int] = (32, 32), shift: int = 4, flip: bool = False,
                 num_ops: int = 2, cutout: int = 16) -> None:
        super().__init__()
        weak = [K.RandomCrop(image_size, padding=shift, padding_mode="reflect")]
        if flip:
            weak.append(K.RandomHorizontalFlip())
        self.weak_ops = nn.Sequential(*weak)
        self.ops = nn.ModuleDict(strong_ops())
        self.num_ops = num_ops
        area = cutout * cutout / (image_size[0] * image_size[1])
        self.cutout = K.RandomErasing(scale=(area, area), ratio=(1.0, 1.0), value=0.5, p=1.0) if cutout else nn.Identity()

    def weak(self, images: Tensor) -> Tensor:
        return self.weak_ops(images)

    def strong(self, images: Tensor) -> Tensor:
        x = self.weak(images)
        choices = torch.randint(len(self.ops), (self.num_ops, x.shape[0]), device=x.device)
        for slot in choices:
            x = x.clone()
            for index, op in enumerate(self.ops.values()):
                chosen = (slot == index).nonzero().squeeze(1)
                if chosen.numel():
                    x[chosen] = op(x[chosen]).clamp(0, 1)
        return self.cutout(x)
