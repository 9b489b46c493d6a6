"""Run directories are append-only: where a run goes, what may go where, and whether a checkpoint fits.

- A new run gets ``runs/<time>-<source>-<target>-<norm>`` (or ``--run_dir``); a directory that
  already holds a run (its ``config.yaml``, ``checkpoints/``, logs or results) is refused, with
  the two fixes: another ``--run_dir``, or ``--ckpt_path`` to resume that run.
- A resume (``--ckpt_path RUN/checkpoints/X.ckpt``) goes on in the checkpoint's run directory
  (unless ``--run_dir`` says otherwise) and continues its history.
- A checkpoint whose method, backbone, norm, classes or image size differ from the command's
  is refused before anything is written, naming what differs and the run's ``config.yaml``.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import torch

from adamatch_uan.cli.errors import UserError

# What a started run leaves in its directory.
RUN_FILES = ("config.yaml", "checkpoints", "metrics.csv", "results.json", "hparams.yaml")
# The model's settings a checkpoint must share with the command that resumes it.
ARCHITECTURE = ("backbone", "backbone_options", "norm", "norm_at", "norm_options", "num_classes", "class_names",
                "image_size")


def holds_a_run(directory: Path) -> bool:
    return directory.is_dir() and any((directory / name).exists() for name in RUN_FILES)


def checkpoint_run(ckpt_path: str | Path) -> Path | None:
    """The run directory a checkpoint belongs to (``RUN/checkpoints/X.ckpt`` → RUN), or None."""
    path = Path(ckpt_path)
    return path.parent.parent if path.parent.name == "checkpoints" and holds_a_run(path.parent.parent) else None


def choose(run_dir: str | None, ckpt_path: str | None, name: str) -> Path:
    """The run directory of this command.

    Args:
        run_dir: ``--run_dir``, or None.
        ckpt_path: ``--ckpt_path`` (a resume), or None.
        name: the default name's tail, ``<source>-<target>-<norm>``.

    Raises:
        UserError: a new run aimed at a directory that holds a run; a missing checkpoint.
    """
    if ckpt_path is not None and not Path(ckpt_path).is_file():
        raise UserError(f"No checkpoint {ckpt_path}; --ckpt_path takes a RUN_DIR/checkpoints/*.ckpt file")
    if run_dir is None:
        resumed = checkpoint_run(ckpt_path) if ckpt_path is not None else None
        if resumed is not None:
            return resumed
        run = Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}"
        while run.exists():  # two runs started in the same second
            run = run.with_name(run.name + "-2")
        return run
    run = Path(run_dir)
    if ckpt_path is None and holds_a_run(run):
        raise UserError(f"{run} holds a run already ({', '.join(n for n in RUN_FILES if (run / n).exists())}); nothing "
                        f"is overwritten: use --run_dir NEW for a new run, or --ckpt_path "
                        f"{run / 'checkpoints' / 'last.ckpt'} to resume that one")
    return run


def check_checkpoint(ckpt_path: str | Path, method: type, hparams: dict) -> None:
    """Refuse a checkpoint that the command's model cannot continue.

    Raises:
        UserError: naming each setting that differs, and the run's config.yaml as the fix.
    """
    saved = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    theirs = saved.get("hyper_parameters", {})
    differ = [f"{key} {theirs.get(key)!r} (the command: {hparams.get(key)!r})" for key in ARCHITECTURE
              if key in theirs and theirs.get(key) != hparams.get(key)]
    run = checkpoint_run(ckpt_path)
    fix = (f"resume with the run's own settings: --config {run / 'config.yaml'} --ckpt_path {ckpt_path}" if run
           else "give the settings it was trained with")
    if differ:
        raise UserError(f"{ckpt_path} was trained with {'; '.join(differ[:4])}; {fix}")
    if "state_dict" not in saved or not any(key.startswith("model.") for key in saved["state_dict"]):
        raise UserError(f"{ckpt_path} holds no {method.__name__} weights; {fix}")


def commit() -> str | None:
    """The code's git commit (with ``+changes`` when the work tree differs), or None outside a checkout."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")
