"""Training throughput of one AdaMatch step for bn, mn and uan, in one run.

    python benchmarks/train_throughput.py [--batch 32] [--uratio 3] [--rounds 3] [--steps 4]
    python benchmarks/train_throughput.py --device cuda [--backbones shallow_cnn wide_resnet]

On CUDA each step is also split, with the device synchronised between the parts, into the
augmentation (weak and strong views of both domains), the two forward passes (source-only and
combined), the backward, the optimiser step and the EMA update, per backbone and norm; the
throughput there is images per second of the whole split step (``split`` in the JSON).

One step: batch B labelled source and uratio·B unlabelled target images (each with a weak
and a strong view), ShallowCNN with the norm at all layers, Lightning's own training loop.
Norms are run in alternating rounds (each round: a short fit per norm) so machine noise
hits them alike; the first step of every fit is warm-up and not timed. Images per second
count source + target images per step over the median step time.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

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


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if batch_idx > 0:
            self.times.append(time.perf_counter() - self.start)


def batches(steps: int, batch: int, uratio: int) -> DataLoader:
    make = lambda n: torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    data = [{"source": (make(batch), torch.randint(0, 10, (batch,))), "target": make(batch * uratio)}
            for _ in range(steps)]
    return DataLoader(data, batch_size=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--uratio", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per fit (plus one warm-up)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--backbones", nargs="+", default=["shallow_cnn", "wide_resnet"],
                        help="backbones of the split step (--device cuda, or --split)")
    parser.add_argument("--split", action="store_true", help="the split step on the CPU too")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/train_throughput.json"))
    args = parser.parse_args()
    if args.device == "cuda" or args.split:
        return split_main(args)
    torch.manual_seed(0)
    data = batches(args.steps + 1, args.batch, args.uratio)
    times: dict[str, list[float]] = {norm: [] for norm in NORMS}
    for _ in range(args.rounds):
        for norm in NORMS:
            timer = StepTimer()
            trainer = L.Trainer(max_steps=args.steps + 1, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                                callbacks=[timer])
            trainer.fit(AdaMatch(backbone="shallow_cnn", norm=norm, norm_at="all"), data)
            times[norm].extend(timer.times)
    images = args.batch * (1 + args.uratio)
    rows = {norm: {"median_step_s": statistics.median(t), "images_per_s": images / statistics.median(t)}
            for norm, t in times.items()}
    for row in rows.values():
        row["throughput_vs_bn"] = row["images_per_s"] / rows["bn"]["images_per_s"]
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
              "batch": args.batch, "uratio": args.uratio, "timed_steps_per_norm": len(times["bn"]), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"{'norm':<6}{'step s':>10}{'images/s':>12}{'vs bn':>8}")
    for norm, row in rows.items():
        print(f"{norm:<6}{row['median_step_s']:>10.3f}{row['images_per_s']:>12.1f}{row['throughput_vs_bn']:>8.2f}")
    print(f"written to {args.out}")


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
