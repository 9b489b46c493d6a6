"""Training step time of AdaMatch (and plain classification) for bn, mn and uan in each mode, in one run.

    python benchmarks/train_throughput.py [--batch 32] [--uratio 3] [--rounds 2] [--steps 4] [--modes ...]
    python benchmarks/train_throughput.py --device cuda [--backbones shallow_cnn wide_resnet]

Modes: float32 or bf16 autocast (Lightning's ``bf16-mixed``) × torch's default layout (NCHW) or
channels-last (NHWC, ``channels_last=True``), and bf16 channels-last with ``torch.compile`` of the
backbone. The table gives each norm's median step and its speed-up over the same norm's float32
NCHW step, and UAN/BN and MN/BN throughput within each mode; plain classification
(``supervised/shallow_cnn``) trains on B·(1 + uratio) labelled images per step.

On CUDA each step is also split, with the device synchronised between the parts, into the
augmentation (weak and strong views of both domains), the two forward passes (source-only and
combined), the backward, the optimiser step and the EMA update, per backbone and norm; the
throughput there is images per second of the whole split step (``split`` in the JSON).

One step: batch B labelled source and uratio·B unlabelled target images (each with a weak
and a strong view), ShallowCNN with the norm at all layers, Lightning's own training loop.
Norms are run in alternating rounds (each round: a short fit per norm) so machine noise
hits them alike; the first step of every fit is warm-up and not timed. Images per second
count source + target images per step over the median step time. ``--freed-memory keep`` times
the steps with malloc keeping freed memory, as ``fit`` runs them with ``ADAMATCH_UAN_KEEP_FREED_MEMORY=1``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from adamatch_uan.cli import cpu_memory
from adamatch_uan.methods import AdaMatch

PARTS = ["augment", "passes", "backward", "optimizer", "ema"]


def split_step_times(backbone: str, norm: str, device: str, batch: int, uratio: int, steps: int) -> dict[str, float]:
    """Median seconds of each part of an AdaMatch step, the device synchronised between parts."""
    torch.manual_seed(0)
    method = AdaMatch(backbone=backbone, norm=norm, norm_at="all").to(device).train()
    optimizer = torch.optim.SGD(method.model.parameters(), lr=0.03, momentum=0.9)
    make = lambda n: torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, device=device)  # noqa: E731
    source_images, target_images = make(batch), make(batch * uratio)
    labels = torch.randint(0, 10, (batch,), device=device)
    times: dict[str, list[float]] = {part: [] for part in PARTS}

    def mark() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    for i in range(steps + 2):
        t = [mark()]
        source, target = method.views(source_images), method.views(target_images)
        t.append(mark())
        source_logits, target_logits, _ = method.forward_passes(source, target)
        t.append(mark())
        pseudo = target_logits[: len(target_images)].detach().argmax(1)
        loss = (torch.nn.functional.cross_entropy(source_logits[:batch], labels)
                + torch.nn.functional.cross_entropy(target_logits[len(target_images):], pseudo))
        loss.backward()
        t.append(mark())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t.append(mark())
        method.ema.update_parameters(method.model)
        t.append(mark())
        if i >= 2:  # warm-up: kernel compilation, allocator
            for part, start, end in zip(PARTS, t, t[1:]):
                times[part].append(end - start)
    return {part: statistics.median(v) for part, v in times.items()}

NORMS = ["bn", "mn", "uan"]
# (name, Lightning precision, channels-last model and inputs, torch.compile of the backbone)
MODES = {"fp32-nchw": ("32-true", False, False), "fp32-nhwc": ("32-true", True, False),
         "bf16-nchw": ("bf16-mixed", False, False), "bf16-nhwc": ("bf16-mixed", True, False),
         "bf16-nhwc-compiled": ("bf16-mixed", True, True)}
BASELINE = "fp32-nchw"


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if batch_idx > 0:
            self.times.append(time.perf_counter() - self.start)


def batches(steps: int, batch: int, uratio: int, labelled_only: bool) -> DataLoader:
    make = lambda n: torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)  # noqa: E731
    data = [{"source": (make(batch), torch.randint(0, 10, (batch,))), **({} if labelled_only else {"target": make(batch * uratio)})}
            for _ in range(steps)]
    return DataLoader(data, batch_size=None)


def fit_times(method: str, backbone: str, norm: str, mode: str, data: DataLoader, steps: int) -> list[float]:
    """Step times of a short fit (the first step, warm-up, not timed)."""
    from adamatch_uan.methods import Supervised

    precision, nhwc, compiled = MODES[mode]
    cls = AdaMatch if method == "adamatch" else Supervised
    module = cls(backbone=backbone, norm=norm, norm_at="all", channels_last=nhwc)
    if compiled:
        module.model.compile()
    timer = StepTimer()
    trainer = L.Trainer(max_steps=steps + 1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", precision=precision, callbacks=[timer])
    trainer.fit(module, data)
    return timer.times


def markdown(rows: dict, modes: list[str]) -> str:
    """Per (method, backbone): a row per mode, each norm's step (ms) and speed-up over its fp32-nchw step,
    and UAN/BN and MN/BN throughput within the mode."""
    lines = ["| method, backbone | mode | " + " | ".join(f"{n} step ms (× fp32-nchw)" for n in NORMS)
             + " | UAN/BN | MN/BN |", "|---|---|" + "---:|" * (len(NORMS) + 2)]
    for key, by_mode in rows.items():
        for mode in modes:
            if mode not in by_mode:
                continue
            row = by_mode[mode]
            cells = [f"{1e3 * row[n]['median_step_s']:.0f} ({row[n]['speedup']:.2f}×)" for n in NORMS]
            lines.append(f"| {key} | {mode} | " + " | ".join(cells)
                         + f" | {row['uan']['throughput_vs_bn']:.2f} | {row['mn']['throughput_vs_bn']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--uratio", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per fit (plus one warm-up)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--runs", nargs="+", default=["adamatch/shallow_cnn", "supervised/shallow_cnn", "adamatch/wide_resnet"],
                        help="method/backbone pairs (supervised: plain classification, batch × (1 + uratio) images)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--backbones", nargs="+", default=["shallow_cnn", "wide_resnet"],
                        help="backbones of the split step (--device cuda, or --split)")
    parser.add_argument("--split", action="store_true", help="the split step on the CPU too")
    cpu_memory.add_option(parser)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/train_throughput.json"))
    args = parser.parse_args()
    kept = args.device == "cpu" and cpu_memory.kept(args)  # before the split step too, which would otherwise ignore it
    if args.device == "cuda" or args.split:
        return split_main(args)
    torch.manual_seed(0)
    images = args.batch * (1 + args.uratio)
    rows: dict[str, dict] = {}
    for run in args.runs:
        method, backbone = run.split("/")
        # Plain classification trains on as many labelled images per step as AdaMatch's source + target.
        data = batches(args.steps + 1, images if method == "supervised" else args.batch, args.uratio,
                       labelled_only=method == "supervised")
        steps = args.steps if backbone == "shallow_cnn" else max(args.steps // 2, 2)
        times = {(mode, norm): [] for mode in args.modes for norm in NORMS}
        for _ in range(args.rounds):  # rounds alternate modes and norms so machine noise hits them alike
            for mode in args.modes:
                for norm in NORMS:
                    times[(mode, norm)].extend(fit_times(method, backbone, norm, mode, data, steps))
        by_mode: dict[str, dict] = {}
        for (mode, norm), t in times.items():
            by_mode.setdefault(mode, {})[norm] = {"median_step_s": statistics.median(t), "images_per_s": images / statistics.median(t),
                                                  "steps_timed": len(t)}
        for mode, row in by_mode.items():
            for norm, entry in row.items():
                entry["throughput_vs_bn"] = entry["images_per_s"] / row["bn"]["images_per_s"]
                base = by_mode.get(BASELINE, {}).get(norm)
                entry["speedup"] = base["median_step_s"] / entry["median_step_s"] if base else float("nan")
        rows[f"{method}, {backbone}"] = by_mode
    preload = os.environ.get("LD_PRELOAD")  # an allocator preloaded (tcmalloc) changes every row: the command names it
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, {platform.processor() or ''} {torch.get_num_threads()} threads, "
                         f"torch {torch.__version__}",
              "command": (f"LD_PRELOAD={preload} " if preload else "") + "python benchmarks/train_throughput.py "
                         + " ".join(sys.argv[1:]),
              "batch": args.batch, "uratio": args.uratio, "rounds": args.rounds, "freed_memory_kept": kept,
              "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    table = markdown(rows, args.modes)
    args.out.with_suffix(".md").write_text(table)
    print(table)
    print(f"written to {args.out} and {args.out.with_suffix('.md')}")


def split_main(args) -> None:
    images = args.batch * (1 + args.uratio)
    split = {}
    for backbone in args.backbones:
        for norm in NORMS:
            parts = split_step_times(backbone, norm, args.device, args.batch, args.uratio, max(args.steps, 10))
            total = sum(parts.values())
            split[f"{backbone}/{norm}"] = {"parts_s": parts, "step_s": total, "images_per_s": images / total}
    for key, row in split.items():
        bn = split[key.split("/")[0] + "/bn"]
        row["throughput_vs_bn"] = row["images_per_s"] / bn["images_per_s"]
        row["augment_plus_ema_over_bn_step"] = (row["parts_s"]["augment"] + row["parts_s"]["ema"]) / bn["step_s"]
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": torch.cuda.get_device_name() if args.device == "cuda" else "CPU",
              "torch": torch.__version__, "batch": args.batch, "uratio": args.uratio, "split": split}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"{'backbone/norm':<22}" + "".join(f"{p + ' ms':>13}" for p in PARTS) + f"{'step ms':>10}{'vs bn':>7}")
    for key, row in split.items():
        print(f"{key:<22}" + "".join(f"{row['parts_s'][p] * 1e3:>13.2f}" for p in PARTS)
              + f"{row['step_s'] * 1e3:>10.2f}{row['throughput_vs_bn']:>7.2f}")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
