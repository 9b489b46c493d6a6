"""Where an AdaMatch step's CPU time goes, for each norm: torch's profiler over a short fit's steps.

    python benchmarks/step_profile.py [--backbone shallow_cnn] [--mode bf16-nhwc] [--steps 3] [--freed-memory keep]

Each norm trains a short fit (Lightning's loop; the batches and modes of ``train_throughput.py``, but for
the compiled one, whose backward is one node for the whole graph) and
``--steps`` steps after two warm-up steps are profiled. Each op's self CPU time is put in one group:
the norm layers' forward (everything inside the layers' ``forward``) and backward (their autograd
nodes: BatchNorm's, GroupNorm's, the mixture op's), the convolutions, pooling and ReLU, and the rest
(augmentation, losses, the optimizer, the EMA, the loop). The table puts the norms side by side.

What UAN's norm layers may cost for UAN/BN to reach ``--target``, the rest of UAN's step as measured:

    budget = BN step / target − (UAN step − UAN's norm layers)

Profiled steps are slower than ``train_throughput.py``'s timed ones by the profiler's own cost,
which falls mostly on the many small ops; the groups are what this script is for.
"""

from __future__ import annotations

import argparse
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import lightning as L
import torch

from adamatch_uan.cli import cpu_memory
from adamatch_uan.methods import AdaMatch
from adamatch_uan.norm import make_norm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from da_table import publish  # noqa: E402
from train_throughput import MODES, NORMS, batches  # noqa: E402

GROUPS = ["norm forward", "norm backward", "convolution", "pool, ReLU", "rest"]
NORM_RANGE = "norm layer forward"
EVALUATE = "autograd::engine::evaluate_function: "
# Autograd nodes of the norm layers (a node's name is what evaluate_function names).
NORM_NODES = ("BatchNorm", "GroupNorm", "adamatch_uan")


class NormRanges:
    """Marks every call of the model's norm layers (modules of ``norm_type``) as a profiler range."""

    def __init__(self, model: torch.nn.Module, norm_type: type) -> None:
        self.open: list[torch.autograd.profiler.record_function] = []
        for module in model.modules():
            if isinstance(module, norm_type):
                module.register_forward_pre_hook(self.enter)
                module.register_forward_hook(self.exit)

    def enter(self, module, args) -> None:
        self.open.append(torch.autograd.profiler.record_function(NORM_RANGE))
        self.open[-1].__enter__()

    def exit(self, module, args, output) -> None:
        self.open.pop().__exit__(None, None, None)


class Profile(L.Callback):
    """torch's profiler over steps [first, first + steps)."""

    def __init__(self, first: int, steps: int) -> None:
        self.first, self.last = first, first + steps - 1

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if batch_idx == self.first:
            self.profiler = torch.profiler.profile()
            self.profiler.__enter__()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.last:
            self.profiler.__exit__(None, None, None)


def group_of(event) -> str:
    """The group of a profiled op: that of its nearest marked ancestor, else its own name's.

    An add directly under an autograd node's evaluation is the engine summing the gradients of a
    tensor with several consumers (a residual block's input), after whichever node came last: the rest.
    """
    parent = event.cpu_parent
    if event.name in ("aten::add_", "aten::add") and parent is not None and parent.name.startswith(EVALUATE):
        return "rest"
    node = event
    while node is not None:
        if node.name == NORM_RANGE:
            return "norm forward"
        if node.name.startswith(EVALUATE):
            if any(key in node.name for key in NORM_NODES):
                return "norm backward"
        node = node.cpu_parent
    name = event.name
    if "convolution" in name:
        return "convolution"
    if any(key in name for key in ("max_pool", "threshold", "clamp_min", "relu")):
        return "pool, ReLU"
    return "rest"


def profile(backbone: str, norm: str, mode: str, batch: int, uratio: int, steps: int, top: int | None = 6) -> dict:
    """Self CPU milliseconds per step: in total, per group, and the ``top`` largest ops of each group (None: all)."""
    precision, nhwc, compiled = MODES[mode]
    if compiled:
        raise ValueError(f"Expected a mode without torch.compile, got {mode!r}: its backward is one node for the whole graph")
    module = AdaMatch(backbone=backbone, norm=norm, norm_at="all", channels_last=nhwc)
    NormRanges(module.model, type(make_norm(norm, 8)))
    profiler = Profile(first=2, steps=steps)
    trainer = L.Trainer(max_steps=steps + 2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", precision=precision, callbacks=[profiler])
    torch.manual_seed(0)
    trainer.fit(module, batches(steps + 2, batch, uratio, labelled_only=False))
    ops: dict[str, dict[str, float]] = {group: {} for group in GROUPS}
    for event in profiler.profiler.events():
        in_group = ops[group_of(event)]
        in_group[event.name] = in_group.get(event.name, 0.0) + event.self_cpu_time_total / 1e3 / steps
    groups = {group: sum(by_name.values()) for group, by_name in ops.items()}
    largest = {group: dict(sorted(by_name.items(), key=lambda item: -item[1])[:top]) for group, by_name in ops.items()}
    return {"step_ms": sum(groups.values()), "groups_ms": groups, "top_ops_ms": largest}


def markdown(rows: dict[str, dict], target: float) -> str:
    """The groups, a column per norm, and UAN's budget for UAN/BN ≥ target (the module docstring's formula)."""
    lines = ["| group | " + " | ".join(f"{n} ms/step" for n in rows) + " |", "|---|" + "---:|" * len(rows)]
    for group in [*GROUPS, "step"]:
        cells = [row["step_ms"] if group == "step" else row["groups_ms"][group] for row in rows.values()]
        lines.append(f"| {group} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    text = "\n".join(lines) + "\n"
    if "bn" in rows and "uan" in rows:
        bn, uan = rows["bn"], rows["uan"]
        layers = uan["groups_ms"]["norm forward"] + uan["groups_ms"]["norm backward"]
        budget = bn["step_ms"] / target - (uan["step_ms"] - layers)
        text += (f"\nUAN/BN {bn['step_ms'] / uan['step_ms']:.2f} here; for UAN/BN ≥ {target} UAN's norm layers may cost "
                 f"{budget:.1f} ms per step, against {layers:.1f} ms measured "
                 f"(BatchNorm's: {bn['groups_ms']['norm forward'] + bn['groups_ms']['norm backward']:.1f} ms).\n")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="shallow_cnn", choices=["shallow_cnn", "wide_resnet"])
    parser.add_argument("--mode", default="bf16-nhwc", choices=[mode for mode, (_, _, compiled) in MODES.items() if not compiled])
    parser.add_argument("--norms", nargs="+", default=NORMS, choices=NORMS)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--uratio", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (after two warm-up steps)")
    parser.add_argument("--target", type=float, default=0.95, help="the UAN/BN throughput the budget is for")
    cpu_memory.add_option(parser)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/step_profile.json"))
    args = parser.parse_args()
    kept = cpu_memory.kept(args)
    rows = {norm: profile(args.backbone, norm, args.mode, args.batch, args.uratio, args.steps) for norm in args.norms}
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
              "command": "python benchmarks/step_profile.py " + " ".join(sys.argv[1:]),
              "backbone": args.backbone, "mode": args.mode, "batch": args.batch, "uratio": args.uratio,
              "steps": args.steps, "freed_memory_kept": kept, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    publish(args.out.with_suffix(""), result, markdown(rows, args.target))
    print(f"written to {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
