"""Training throughput of one AdaMatch step for bn, mn and uan, in one run.

    python benchmarks/train_throughput.py [--batch 32] [--uratio 3] [--rounds 3] [--steps 4]

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
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/train_throughput.json"))
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
