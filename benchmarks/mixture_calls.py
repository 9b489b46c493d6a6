"""Where a UAN layer's time goes: its autograd node (the two mixture-kernel calls) against
the whole layer and torch BatchNorm (K = 3, CPU), each timed back to back.

    python benchmarks/mixture_calls.py [--repeats 200] [--tau-cache-bytes N] [--out benchmarks/results/mixture_calls.json]

``node`` is ``kernel.transform`` forward and backward on the layer's tables (the compiled
node when available), ``node forward`` its forward alone without autograd; the rest of the
layer's time is the module and the Python around the node. ``--tau-cache-bytes`` overrides
``kernel.TAU_CACHE_BYTES`` (0: every pass recomputes the responsibilities).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from adamatch_uan.norm import backends as kernel, make_norm

SHAPES = [(256, 128, 8, 8), (256, 256)]


def median_ms(fn, repeats: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure(shape: tuple[int, ...], repeats: int) -> dict[str, float]:
    x = torch.randn(shape, requires_grad=True)
    grad = torch.randn(shape)
    layers = {"bn": make_norm("bn", shape[1]), "uan": make_norm("uan", shape[1])}

    def step(layer):
        layer(x).backward(grad)
        x.grad = None

    times = {f"{name} layer": median_ms(lambda: step(layer), repeats) for name, layer in layers.items()}
    uan = layers["uan"]
    x3, gy = x.detach().reshape(shape[0], shape[1], -1), grad.reshape(shape[0], shape[1], -1)
    params = (uan.prior_logits, uan.mean, uan.raw_var, uan.weight, uan.bias, None, None)

    def node():
        return kernel.transform(x3, None, uan.eps, (uan.min_weight, uan.min_var), None, False, *params)

    times["node"] = median_ms(lambda: node()[0].backward(gy), repeats)
    with torch.no_grad():
        times["node forward"] = median_ms(node, repeats)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--tau-cache-bytes", type=int, default=kernel.TAU_CACHE_BYTES)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/mixture_calls.json"))
    args = parser.parse_args()
    kernel.TAU_CACHE_BYTES = args.tau_cache_bytes
    rows = [{"shape": list(shape), "median_ms": measure(shape, args.repeats)} for shape in SHAPES]
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
              "cpu_kernel": kernel.kernel_available(), "tau_cache_bytes": args.tau_cache_bytes,
              "repeats": args.repeats, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    names = list(rows[0]["median_ms"])
    print(f"{'shape':<20}" + "".join(f"{n:>14}" for n in names) + f"{'node/uan':>10}")
    for row in rows:
        t = row["median_ms"]
        print(f"{str(tuple(row['shape'])):<20}" + "".join(f"{t[n]:>14.3f}" for n in names)
              + f"{t['node'] / t['uan layer']:>10.2f}")
    print(f"milliseconds; written to {args.out}")


if __name__ == "__main__":
    main()
