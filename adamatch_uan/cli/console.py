"""What the commands print: Lightning's start-up chatter and known-irrelevant warnings left out."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

# Lightning's info lines at start-up (accelerators found, the logger advert) and warnings that do not
# concern these commands' users.
METRICS = ("acc", "precision", "recall", "f1")

_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda",
            "lightning.fabric.utilities.rank_zero", "lightning.pytorch.callbacks.model_summary",
            "lightning.fabric.utilities.seed")
IRRELEVANT_WARNINGS = (
    r".*does not have many workers.*",                         # the data are tensors in memory
    r".*`torch.jit.trace` is deprecated.*", r".*`torch.jit.trace_method` is deprecated.*",
    r".*Found .* module\(s\) in eval mode at the start of training.*",
    r".*The number of training batches .* is smaller than the logging interval.*",
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",  # Lightning's own use of torch's pytree
    r".*ckpt_path=None\)` was called without a model.*",  # a fast_dev_run tests the weights it has
    r".*ckpt_path=\"last\"\) is set, but there is no last checkpoint.*",  # a fresh run has nothing to resume
    r".*Checkpoint directory .* exists and is not empty.*",  # a resumed run's
    r".*`weights_only` was not set, defaulting to `False`.*",  # our own checkpoints
)


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's info lines and the warnings of ``IRRELEVANT_WARNINGS`` left out in this block."""
    levels = {name: logging.getLogger(name).level for name in _LOGGERS}
    for name in _LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            for pattern in IRRELEVANT_WARNINGS:
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def results_table(results: dict) -> str:
    """The metrics of ``results["test"]`` (set → metric → value) as a table, one row per set."""
    lines = [f"{'set':<10}{'images':>8}" + "".join(f"{m:>11}" for m in METRICS)]
    for name, metrics in results["test"].items():
        lines.append(f"{name:<10}{metrics.get('images', '-'):>8}" + "".join(f"{metrics[m]:>11.4f}" for m in METRICS))
    return "\n".join(lines)
