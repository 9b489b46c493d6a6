"""A finished run as a ready classifier: the selected checkpoint's evaluated (EMA) weights, the run's
classes, its preprocessing and its context rule. ``predict.py``, ``evaluate.py``, ``export.py`` and
the end of ``fit`` all use it.

    import adamatch_uan

    classifier = adamatch_uan.load("runs/my-run")            # eval mode, EMA weights, on the CPU
    result = classifier.predict("photos/")                    # a folder, files, a glob, or uint8 arrays
    result.names, result.confidence, result.probabilities     # per image, in the run's class order

Images of any size are made what the run trained on (``data.preprocess``: the run's image size,
grey → RGB, 28×28 digits padded to 32×32); the model sees them with the context id the run
evaluates target images with (``target_context``).
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import Tensor

from adamatch_uan.cli.errors import UserError
from adamatch_uan.data import DomainError, load_domain, resizer
from adamatch_uan.data.image_folders import decode, image_files, image_sizes
from adamatch_uan.methods import DomainAdaptationMethod

CHECKPOINT_CHOICES = ("best", "last")
Images = str | Path | Tensor | np.ndarray | Sequence[str | Path]
"""A folder (any depth), an image file, a glob pattern, an ``.npz`` file (its x, or x_train and x_test),
a domain spec (``npz:``, ``folder:``, ``images:``, ``mnist``, …: its training images), a list of those,
or uint8 images: a tensor (N, [C,] H, W) or an array (N, H, W[, C])."""


@dataclasses.dataclass
class Predictions:
    """What a classifier says of some images.

    Attributes:
        ids: where each image came from (its path, or ``"<source>[i]"``).
        probabilities: (N, K) class probabilities, in the order of ``class_names``.
        class_names: the run's classes.
    """

    ids: list[str]
    probabilities: Tensor
    class_names: list[str]

    @property
    def indices(self) -> Tensor:
        return self.probabilities.argmax(1)

    @property
    def confidence(self) -> Tensor:
        return self.probabilities.max(1).values

    @property
    def names(self) -> list[str]:
        return [self.class_names[i] for i in self.indices.tolist()]

    def write_csv(self, path: str | Path, replace: bool = False) -> Path:
        """One row per image: ``image, class, confidence, p_<class>...``. An existing file is an error,
        unless ``replace`` (a run rewriting its own file, which is then replaced whole or not at all).

        Raises:
            UserError: ``path`` exists and ``replace`` is False.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        written = path.with_name(path.name + ".partial") if replace else path
        try:
            with written.open("w" if replace else "x", newline="") as f:  # "x": never overwrite what a user has
                writer = csv.writer(f)
                writer.writerow(["image", "class", "confidence", *(f"p_{name}" for name in self.class_names)])
                for image, name, confidence, probabilities in zip(self.ids, self.names, self.confidence.tolist(),
                                                                 self.probabilities.tolist()):
                    writer.writerow([image, name, f"{confidence:.6f}", *(f"{p:.6f}" for p in probabilities)])
        except FileExistsError:
            raise UserError(f"{path} exists; choose another --out (nothing is ever overwritten)") from None
        if replace:
            os.replace(written, path)
        return path


def _array_images(array: Tensor | np.ndarray) -> Tensor:
    """uint8 (N, C, H, W) from a tensor (N, [C,] H, W) or an array (N, H, W[, C])."""
    if isinstance(array, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(array))
        x = x.permute(0, 3, 1, 2) if x.dim() == 4 else x
    else:
        x = array
    if x.dtype != torch.uint8 or x.dim() not in (3, 4):
        raise UserError(f"Expected uint8 images (N, [C,] H, W), got {x.dtype} {tuple(x.shape)}")
    return x.unsqueeze(1) if x.dim() == 3 else x


def _npz_images(path: Path) -> tuple[Tensor, list[str]]:
    try:
        with np.load(path) as data:
            keys = [k for k in ("x", "x_train", "x_test") if k in data.files]
            arrays = [(key, data[key]) for key in keys]
    except Exception as error:
        raise UserError(f"Could not read {path} as an npz file ({type(error).__name__}: {error})") from error
    if not arrays:
        raise UserError(f"Expected x (or x_train, x_test) in {path}")
    images = [_array_images(array) for _, array in arrays]
    sizes = {tuple(i.shape[-2:]) for i in images}
    if len(sizes) > 1:
        raise UserError(f"Expected one image size in {path}, got {sorted(sizes)}")
    return torch.cat(images), [f"{path.name}:{key}[{i}]" for key, array in arrays for i in range(len(array))]


class Classifier:
    """A trained method's evaluated model, ready to classify images as the run saw them.

    Args:
        module: the trained method (its checkpoint's weights), put in eval mode.
        root: where domain specs (``mnist``, ...) are read from.
    """

    def __init__(self, module: DomainAdaptationMethod, root: str | Path = ".") -> None:
        self.module = module.eval()
        self.root = root

    @property
    def class_names(self) -> list[str]:
        return list(self.module.class_names)

    @property
    def image_size(self) -> int:
        return int(self.module.hparams.image_size)

    def read(self, images: Images) -> tuple[Tensor, list[str], int]:
        """The images as the run's input, uint8 (N, 3, S, S), where each came from, and how many had
        another size (resized as the run's were, ``data.preprocess``).

        Raises:
            UserError, DomainError: nothing to read, an unreadable image (named), a malformed file.
        """
        if isinstance(images, (Tensor, np.ndarray)):
            raw = _array_images(images)
            resized = int(tuple(raw.shape[-2:]) != (self.image_size, self.image_size)) * len(raw)
            return resizer(self.image_size)[0](raw), [f"images[{i}]" for i in range(len(raw))], resized
        items = [images] if isinstance(images, (str, Path)) else list(images)
        parts = [self._read_one(str(item)) for item in items]
        if not parts:
            raise UserError("Expected images to read, got none")
        return (torch.cat([p[0] for p in parts]), [i for p in parts for i in p[1]], sum(p[2] for p in parts))

    def _read_one(self, item: str) -> tuple[Tensor, list[str], int]:
        side = (self.image_size, self.image_size)
        path = Path(item).expanduser()
        if path.is_file() and path.suffix == ".npz":
            raw, ids = _npz_images(path)
            return resizer(self.image_size)[0](raw), ids, len(raw) * (tuple(raw.shape[-2:]) != side)
        if not path.exists() and not any(c in item for c in "*?["):
            if item.partition(":")[0] not in ("npz", "folder", "images") and ("/" in item or "." in item):
                raise UserError(f"No such file or folder: {item}")
            domain = load_domain(item, self.root, train=True, download=False, size=self.image_size)
            if domain is None:
                raise UserError(f"{item} has no images to predict")
            return domain.images, domain.ids, 0
        paths = image_files(item)
        if not paths:
            raise UserError(f"Found no image files in {item}")
        sizes = image_sizes(paths)  # also names an unreadable file before any decoding
        return decode(paths, self.image_size, item), [str(p) for p in paths], sum(s != side for s in sizes)

    def predict(self, images: Images, batch_size: int = 256) -> Predictions:
        """Class probabilities of ``images`` (``Images``), in batches, on the module's device."""
        inputs, ids, _ = self.read(images)
        return Predictions(ids, self.probabilities(inputs, batch_size), self.class_names)

    @torch.no_grad()
    def probabilities(self, inputs: Tensor, batch_size: int = 256) -> Tensor:
        """(N, K) class probabilities of images already made the run's input (``read``)."""
        device = next(self.module.parameters()).device
        return torch.cat([self.module.predict_step(batch.to(device)).cpu() for batch in inputs.split(batch_size)])


def find_checkpoint(run_dir: Path, checkpoint: str = "best") -> Path:
    """The checkpoint a run directory offers: ``best`` (selected on source validation; the one
    ``results.json`` names when the run finished), ``last``, or a path.

    Raises:
        UserError: no such checkpoint, with what the run directory holds.
    """
    if checkpoint not in CHECKPOINT_CHOICES:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise UserError(f"No checkpoint file {path}; use --checkpoint best, last or a .ckpt path")
        return path
    folder = run_dir / "checkpoints"
    found = sorted(folder.glob("best-*.ckpt")) if checkpoint == "best" else [folder / "last.ckpt"]
    found = [p for p in found if p.is_file()]
    if not found:
        held = sorted(p.name for p in folder.glob("*.ckpt")) if folder.is_dir() else []
        raise UserError(f"{run_dir} has no {checkpoint} checkpoint (checkpoints/: {', '.join(held) or 'none'}); "
                        f"resume the run to its next validation, or use --checkpoint PATH")
    return max(found, key=lambda p: p.stat().st_mtime_ns)


def load(run_dir: str | Path, checkpoint: str = "best", device: str | torch.device = "cpu") -> Classifier:
    """The classifier a run directory holds: its method's class (``config.yaml``), the checkpoint's
    weights (``find_checkpoint``), in eval mode on ``device``.

    Raises:
        UserError: not a run directory, no checkpoint, or a checkpoint that does not load.
    """
    run = Path(run_dir).expanduser()
    config_file = run / "config.yaml"
    if not config_file.is_file():
        raise UserError(f"{run} is not a run directory (no config.yaml); give the directory fit wrote "
                        f"(printed at its start and end)")
    config = yaml.safe_load(config_file.read_text())
    path = find_checkpoint(run, checkpoint)
    module_name, _, class_name = config["model"]["class_path"].rpartition(".")
    method = getattr(importlib.import_module(module_name), class_name)
    try:
        module = method.load_from_checkpoint(path, map_location=device, weights_only=False)
    except (RuntimeError, KeyError, TypeError) as error:
        raise UserError(f"Could not load {path} as a {class_name} checkpoint: {str(error).splitlines()[0]}") from error
    root = config.get("data", {}).get("init_args", {}).get("root", ".")
    return Classifier(module.to(device), root=os.path.expanduser(root))


__all__ = ["Classifier", "DomainError", "Predictions", "find_checkpoint", "load"]
