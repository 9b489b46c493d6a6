"""How images become the uint8 (N, 3, S, S) tensors a run trains on, and whether they fit in memory.

The rule of an image size S (``resizer``), applied per image:

- S = 32 (the digit sets' size, docs/METHOD.md §5): 28×28 images are zero-padded by 2 px,
  16×16 ones resized to 28×28 then padded, other sizes resized to 32×32;
- another S: square images are resized to S×S; others are resized so that their shorter
  side is S, keeping the aspect ratio, and the centre S×S is kept;
- None: every image keeps its own size.

Resizing is bilinear (antialiased when it shrinks); grey images are repeated to 3 channels.
Images stay in memory as uint8, so a set of N images of side S takes 3·N·S² bytes;
``check_memory`` refuses a set that would take more than half of the memory available.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

from adamatch_uan.data.errors import DomainError

Resize = Callable[[Tensor], Tensor]
"""uint8 (N, C, H, W) → uint8 (N, 3, S, S) (or (N, 3, H, W) for the native size)."""

MEMORY_FRACTION = 0.5  # of the memory available: the model, the batches and a second copy need the rest


def resize_bilinear(x: Tensor, size: tuple[int, int]) -> Tensor:
    """uint8 (N, C, H, W) → uint8 (N, C, *size), bilinear, antialiased when it shrinks."""
    shrinks = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return (F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False, antialias=shrinks)
            .round().clamp(0, 255).byte())


def to_rgb(images: Tensor) -> Tensor:
    """uint8 (N, H, W) or (N, C, H, W), C in {1, 3} → uint8 (N, 3, H, W), grey repeated."""
    x = images.unsqueeze(1) if images.dim() == 3 else images
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[1] != 3:
        raise DomainError(f"Expected 1 or 3 channels, got {x.shape[1]}")
    return x.contiguous()


def to_rgb32(images: Tensor) -> Tensor:
    """uint8 (N, H, W) or (N, C, H, W), C in {1, 3} → uint8 (N, 3, 32, 32) as §5 prescribes."""
    x = images.unsqueeze(1) if images.dim() == 3 else images
    size = tuple(x.shape[-2:])
    if size == (16, 16):
        x, size = resize_bilinear(x, (28, 28)), (28, 28)
    if size == (28, 28):
        x = F.pad(x, (2, 2, 2, 2))
    elif size != (32, 32):
        x = resize_bilinear(x, (32, 32))
    return to_rgb(x)


def to_square(images: Tensor, side: int) -> Tensor:
    """uint8 (N, [C,] H, W) → uint8 (N, 3, side, side): resized, the shorter side to ``side``, centre kept."""
    x = images.unsqueeze(1) if images.dim() == 3 else images
    h, w = x.shape[-2:]
    if (h, w) != (side, side):
        scale = side / min(h, w)
        x = resize_bilinear(x, (max(side, round(h * scale)), max(side, round(w * scale))))
        top, left = (x.shape[-2] - side) // 2, (x.shape[-1] - side) // 2
        x = x[..., top:top + side, left:left + side]
    return to_rgb(x)


def resizer(size: int | None) -> tuple[Resize, str]:
    """The preprocessing of image size ``size`` (module docstring) and its name (cache keys)."""
    if size == 32:
        return to_rgb32, "rgb32"
    if size is None:
        return to_rgb, "native"
    return (lambda x: to_square(x, size)), f"square{size}"


def describe(size: int | None) -> str:
    """How ``resizer(size)`` treats an image, in words (for messages)."""
    if size is None:
        return "kept at their own size"
    if size == 32:
        return "made 32×32 as the digit sets are (28×28 zero-padded by 2 px, 16×16 resized to 28×28 then padded, others resized)"
    return f"resized to {size}×{size} (the shorter side to {size}, the centre kept)"


def available_memory() -> int:
    """Bytes of memory available to this process (MemAvailable, else the physical memory)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _bytes(count: int) -> str:
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def check_memory(count: int, height: int, width: int, what: str) -> None:
    """Refuse ``count`` uint8 RGB images of height × width if they need more than ``MEMORY_FRACTION``
    of the memory available.

    Raises:
        DomainError: naming the number of images, their size, the memory they need and the fix.
    """
    need = 3 * count * height * width
    budget = int(available_memory() * MEMORY_FRACTION)
    if need > budget:
        fits = max(budget // (3 * count), 1) ** 0.5
        raise DomainError(f"{what}: {count} images of {height}×{width} need {_bytes(need)} in memory as uint8, "
                          f"more than the {_bytes(budget)} this machine can give them (half of what is "
                          f"available); use a smaller --data.image_size (up to about {int(fits)} fits) or fewer "
                          f"images (--data.max_source / --data.max_target)")
