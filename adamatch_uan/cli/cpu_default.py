"""The CPU default: bfloat16 autocast on channels-last tensors where the CPU computes bfloat16 natively.

A new run that names no ``--trainer.precision`` trains in ``bf16-mixed`` with the model and its inputs
channels-last when it runs on a CPU with AVX512_BF16 or AMX: convolutions in bfloat16, augmentations,
norm statistics, the mixtures' maths and the losses in float32. Chosen by the accuracy guard of
docs/RESULTS.md (paired seeds, BN, MN and UAN, against float32 NCHW), which also has the speed-ups.
A resumed run keeps the precision and layout its ``config.yaml`` records (float32 for runs from
before this default). Elsewhere (a GPU, a CPU that would emulate bfloat16) the precision stays
Lightning's float32. ``channels_last`` left unset follows the
precision: channels-last exactly when the run trains in ``bf16-mixed`` on the CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

BFLOAT16 = "bf16-mixed"


def native_bfloat16() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX512_BF16 or AMX tiles); without them oneDNN emulates
    bfloat16 convolutions, slower than float32 ones."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def runs_on_cpu(accelerator) -> bool:
    """Whether Lightning's Trainer will run on the CPU for ``--trainer.accelerator`` (a name or an Accelerator)."""
    if not isinstance(accelerator, str):
        return type(accelerator).__name__ == "CPUAccelerator"
    if accelerator == "auto":
        return not (torch.cuda.is_available() or torch.backends.mps.is_available())
    return accelerator == "cpu"


def started_with(run_dir: Path) -> tuple[str | None, bool | None]:
    """The precision and layout a run's ``config.yaml`` records (None, None where it has none)."""
    config_file = Path(run_dir) / "config.yaml"
    if not config_file.is_file():
        return None, None
    config = yaml.safe_load(config_file.read_text()) or {}
    precision = (config.get("trainer") or {}).get("precision")
    layout = ((config.get("model") or {}).get("init_args") or {}).get("channels_last")
    return (None if precision is None else str(precision)), layout


def resolve(trainer, model_args, resumed_run: Path | None = None) -> str | None:
    """Fill in the precision and layout the user left unset (``None``), in place, as the module docstring says.

    Args:
        trainer: the config's trainer namespace (``precision``, ``accelerator``).
        model_args: the method's init args (``channels_last``, if the method has it).
        resumed_run: the run directory a resumed run continues: what it started with is kept.

    Returns:
        A line telling the user that the CPU default was chosen, or None.
    """
    layout_unset = getattr(model_args, "channels_last", False) is None
    if resumed_run is not None:
        precision, layout = started_with(resumed_run)
        if trainer.precision is None:
            trainer.precision = precision
        if layout_unset and layout is not None:
            model_args.channels_last = layout
    chosen = (trainer.precision is None and resumed_run is None and runs_on_cpu(trainer.accelerator)
              and native_bfloat16())
    if chosen:
        trainer.precision = BFLOAT16
    if getattr(model_args, "channels_last", False) is None:
        model_args.channels_last = str(trainer.precision) == BFLOAT16 and runs_on_cpu(trainer.accelerator)
    if not chosen:
        return None
    layout = ", channels-last" if model_args.channels_last else ""
    return (f"precision: {BFLOAT16}{layout} (this CPU computes bfloat16 natively; --trainer.precision 32-true "
            f"trains in float32)")
