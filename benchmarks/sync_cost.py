"""The cost of syncing norm statistics across processes on the CPU (gloo), in one run.

    python benchmarks/sync_cost.py [--batch 32] [--steps 6] [--norms bn uan mn]

One step: forward + backward of the ShallowCNN (norm at every layer, training mode) on B
images of 3×32×32 per process, one thread per process. Three ways per norm:
  1 × B          one process, no DDP (the per-process baseline);
  2 × B local    two processes under DDP (gradients all-reduced), each norm on its own batch;
  2 × B synced   the same with ``sync_norms`` (statistics over both processes' 2B images).
"sync / local" is the cost of the norm collectives alone; "2×B / 1×B" is the step time of two
processes against one (ideal: 1.0, each process having its own core). Times are medians over
``--steps`` steps after 2 warm-up steps; the first process reports.
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from adamatch_uan.models import make_backbone
from adamatch_uan.norm import sync_norms


def step_times(model: torch.nn.Module, batch: int, steps: int, seed: int) -> list[float]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 32, 32, generator=generator)
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        model(x).square().mean().backward()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return times


def build(norm: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return make_backbone("shallow_cnn", 10, norm=norm, norm_at="all")


def _worker(rank: int, port: int, norm: str, synced: bool, batch: int, steps: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=120))
    model = build(norm)
    if synced:
        sync_norms(model)
    times = step_times(DistributedDataParallel(model), batch, steps, seed=rank)
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    dist.destroy_process_group()


def two_processes(norm: str, synced: bool, batch: int, steps: int) -> list[float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        out = f"{folder}/times.json"
        mp.spawn(_worker, args=(port, norm, synced, batch, steps, out), nprocs=2, join=True)
        return json.loads(Path(out).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--norms", nargs="+", default=["bn", "uan", "mn"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sync_cost.json"))
    args = parser.parse_args()
    rows = {}
    for norm in args.norms:
        torch.set_num_threads(1)
        one = statistics.median(step_times(build(norm), args.batch, args.steps, seed=0))
        local = statistics.median(two_processes(norm, False, args.batch, args.steps))
        synced = statistics.median(two_processes(norm, True, args.batch, args.steps))
        rows[norm] = {"one_process_s": one, "two_local_s": local, "two_synced_s": synced,
                      "sync_over_local": synced / local, "two_synced_over_one": synced / one}
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} thread per process, torch {torch.__version__}",
              "batch_per_process": args.batch, "timed_steps": args.steps, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"{'norm':<6}{'1×B s':>9}{'2×B local':>11}{'2×B synced':>12}{'sync/local':>12}{'2×B/1×B':>9}")
    for norm, r in rows.items():
        print(f"{norm:<6}{r['one_process_s']:>9.3f}{r['two_local_s']:>11.3f}{r['two_synced_s']:>12.3f}"
              f"{r['sync_over_local']:>12.2f}{r['two_synced_over_one']:>9.2f}")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
