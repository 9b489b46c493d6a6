"""``python -m adamatch_uan.export RUN_DIR [--format pt2|torchscript] [--checkpoint ...] [--out FILE]``:
a finished run's classifier as a file that torch alone loads.

The exported module takes uint8 RGB images (N, 3, S, S), made as the run's were (its image
size S; ``adamatch_uan.load(run).read`` or the run's rule in ``data.preprocess``), and returns
the logits (N, K) of the selected checkpoint's evaluated (EMA) model with the run's context
rule; the batch size is free. Formats:

- ``pt2`` (default): ``torch.export`` → ``torch.export.load(FILE).module()(images)``;
- ``torchscript``: ``torch.jit.trace`` → ``torch.jit.load(FILE)(images)``.

The mixture layers are written as torch operations (``norm.backends.torch_ops_only``), not as
the compiled kernel's operators, which only a process that loaded this package's library could
run. The command checks the file against the eager model (with the compiled kernel) on a batch
of another size and refuses one that disagrees. Beside the file, ``FILE.json`` holds the class
names, the image size and the input's description (also inside the file: ``adamatch_uan.json``).
Nothing is overwritten.
"""

from __future__ import annotations

import json
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path

import torch
from jsonargparse import ArgumentParser
from torch import Tensor, nn

from adamatch_uan.augment import to_model_input, to_unit
from adamatch_uan.classifier import CHECKPOINT_CHOICES, Classifier, find_checkpoint, load
from adamatch_uan.cli.errors import UserError, condense, report
from adamatch_uan.data import describe
from adamatch_uan.norm.backends import torch_ops_only

FORMATS = {"pt2": ".pt2", "torchscript": ".torchscript.pt"}
METADATA = "adamatch_uan.json"
# The exported file computes the mixtures with torch operations where the eager model runs the
# compiled kernel: float32 sums in another order.
TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}


class ExportedClassifier(nn.Module):
    """uint8 images (N, 3, S, S) → logits (N, K): the run's input scale, its evaluated model, one context id."""

    def __init__(self, model: nn.Module, context: int) -> None:
        super().__init__()
        self.model, self.context = model, context

    def forward(self, images: Tensor) -> Tensor:
        ids = torch.full((images.shape[0],), self.context, dtype=torch.long, device=images.device)
        return self.model(to_model_input(to_unit(images)), ids)


def export(classifier: Classifier, fmt: str, out: Path, metadata: dict) -> None:
    """Write ``classifier``'s evaluated model in format ``fmt`` to ``out`` (torch operations only)."""
    module = classifier.module
    wrapper = ExportedClassifier(module.evaluated_model, module.hparams.target_context).eval()
    side = classifier.image_size
    example = torch.zeros(2, 3, side, side, dtype=torch.uint8)
    extra = {METADATA: json.dumps(metadata)}
    with torch_ops_only(), torch.no_grad():
        if fmt == "pt2":
            program = torch.export.export(wrapper, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
            torch.export.save(program, out, extra_files=extra)
        else:
            with warnings.catch_warnings():  # its deprecation, and its notes that K and the image size are constants
                warnings.simplefilter("ignore")
                torch.jit.save(torch.jit.trace(wrapper, example), str(out), _extra_files=extra)


def load_exported(path: Path, fmt: str):
    """The exported module, as torch alone loads it."""
    if fmt == "pt2":
        return torch.export.load(path).module()
    with warnings.catch_warnings():  # TorchScript's deprecation: the format is offered for older consumers
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path))


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m adamatch_uan.export", exit_on_error=False, default_env=False,
                       description="A finished run's classifier as a file that torch alone loads.")
    p.add_argument("run_dir", type=str, help="The run directory fit wrote.")
    p.add_argument("--format", type=str, default="pt2", help=f"One of {', '.join(FORMATS)}.")
    p.add_argument("--checkpoint", type=str, default="best",
                   help=f"Which weights: {' or '.join(CHECKPOINT_CHOICES)} (the run's) or a .ckpt path.")
    p.add_argument("--out", type=str | None, default=None, help="File to write (default RUN_DIR/export/model<ext>).")
    return p


def main(args: list[str] | None = None) -> Path:
    """Export, check against the eager model, and return the file's path.

    Raises:
        UserError: bad options, a run without a checkpoint, an existing --out.
        RuntimeError: an exported model that disagrees with the eager one (nothing is left behind).
    """
    try:
        config = parser().parse_args(args)
    except ArgumentError as error:
        raise UserError(f"{condense(str(error))}\n(python -m adamatch_uan.export --help lists the options)") from error
    if config.format not in FORMATS:
        raise UserError(f"Expected --format in {{{', '.join(FORMATS)}}}, got {config.format!r}")
    run = Path(config.run_dir)
    out = Path(config.out) if config.out else run / "export" / f"model{FORMATS[config.format]}"
    sidecar = out.with_name(out.name + ".json")
    for path in (out, sidecar):
        if path.exists():
            raise UserError(f"{path} exists; choose another --out (nothing is ever overwritten)")
    classifier = load(run, config.checkpoint)
    side = classifier.image_size
    metadata = {"format": config.format, "classes": classifier.class_names, "image_size": side,
                "input": f"uint8 RGB images (N, 3, {side}, {side}), {describe(side)}",
                "output": "logits (N, K) in the order of classes; softmax gives probabilities",
                "context": classifier.module.hparams.target_context, "run_dir": str(run),
                "checkpoint": str(find_checkpoint(run, config.checkpoint))}
    out.parent.mkdir(parents=True, exist_ok=True)
    export(classifier, config.format, out, metadata)
    images = torch.randint(0, 256, (5, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager, exported = classifier.module(images), load_exported(out, config.format)(images)
    gap = (eager - exported).abs().max().item()
    if not torch.equal(eager.argmax(1), exported.argmax(1)) or not torch.allclose(exported, eager, **TOLERANCE):
        out.unlink()
        raise RuntimeError(f"The exported model disagrees with the eager one (max |Δ logit| {gap:.2e}); nothing written")
    sidecar.write_text(json.dumps(metadata, indent=2))
    print(f"exported to {out} ({config.format}; max |Δ logit| against the eager model {gap:.1e}); "
          f"classes and input in {sidecar}", file=sys.stdout)
    return out


def run() -> None:
    """``python -m adamatch_uan.export``: ``main``, a user error ending in one short message and status 2."""
    report(main)


if __name__ == "__main__":
    run()
