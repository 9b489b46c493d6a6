"""Forward + backward time of UAN and MN relative to torch BatchNorm (K = 3), in one run.

    python benchmarks/norm_speed.py [--device cuda] [--repeats 15] [--out benchmarks/results/norm_speed.json]
    python benchmarks/norm_speed.py --device cuda --backends torch compiled triton --out benchmarks/results/norm_speed_cuda.json
    python benchmarks/norm_speed.py --mode bf16-nhwc --out benchmarks/results/norm_speed_bf16_nhwc.json
    python benchmarks/norm_speed.py --mode bf16-nhwc --components 1 2 3 4   # UAN at each K too

``--mode bf16-nhwc`` times every layer as the fastest CPU training mode runs it: a bfloat16
channels-last input (as a bf16 convolution writes it), the layer channels-last, under bf16 autocast.

With ``--backends`` every mixture layer (uan, uan_ctx, mn) is timed on each backend named: the
torch-ops backend ("torch"), the same under ``torch.compile`` ("compiled", a baseline) and the
Triton kernels ("triton", CUDA only); rows are named ``<layer>/<backend>``. The effective
bandwidth counts the bytes of x, y, ∂L/∂y and ∂L/∂x moved per step (4 × the input's bytes)
over the time, and on a known GPU its fraction of the peak (``PEAK_GBS``).

Layers are timed round-robin (each repeat runs every layer once) so machine noise hits
them alike, each starting with its input and gradient in cache; the table reports medians
and each median's ratio to BatchNorm's, and the median minor page faults per step (fresh
memory from the allocator: a source of run-to-run spread on mid-sized shapes).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import statistics
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import torch

from adamatch_uan.cli import cpu_memory
from adamatch_uan.norm import backends as kernel, make_norm

SHAPES = [(256, 64, 32, 32), (256, 128, 16, 16), (256, 128, 8, 8), (256, 256)]
# mode -> (the input's dtype, its memory format)
MODES = {"fp32-nchw": (torch.float32, torch.contiguous_format), "bf16-nhwc": (torch.bfloat16, torch.channels_last)}
PEAK_GBS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}  # HBM bandwidth of the SXM parts, GB/s


@contextmanager
def on_backend(name: str | None):
    """Run mixture layers on one backend: "torch" (and "compiled") turn the Triton and C++ paths off."""
    if name in (None, "triton"):
        yield
        return
    saved = kernel._uses_triton, kernel._uses_kernel
    kernel._uses_triton = kernel._uses_kernel = lambda x, mu: False
    try:
        yield
    finally:
        kernel._uses_triton, kernel._uses_kernel = saved


def layers(channels: int, device: str, backends: list[str] | None,
           components: list[int] = ()) -> dict[str, tuple[torch.nn.Module, str | None]]:
    """name -> (layer, backend it runs on; None: the dispatcher's choice); plus a UAN layer ``uan_k<K>`` for
    each K of ``components`` (on the dispatcher's choice)."""
    def mixtures():
        return {"uan": make_norm("uan", channels, num_components=3),
                "uan_ctx": make_norm("uan", channels, num_components=3, num_contexts=2),
                "mn": make_norm("mn", channels, num_components=3)}

    built = {"bn": (make_norm("bn", channels), None)}
    if not backends:
        built.update({name: (layer, None) for name, layer in mixtures().items()})
    built.update({f"uan_k{k}": (make_norm("uan", channels, num_components=k), None) for k in components})
    for backend in backends or []:
        for name, layer in mixtures().items():
            layer = layer.to(device).train()
            built[f"{name}/{backend}"] = (torch.compile(layer) if backend == "compiled" else layer, backend)
    return {name: (layer.to(device).train(), backend) for name, (layer, backend) in built.items()}


def step(layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, context: torch.Tensor) -> None:
    takes_context = getattr(getattr(layer, "_orig_mod", layer), "uses_context", False)
    y = layer(x, context) if takes_context else layer(x)
    y.backward(grad)


def measure(shape: tuple[int, ...], device: str, repeats: int, backends: list[str] | None = None,
            mode: str = "fp32-nchw", components: list[int] = ()) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per step and median minor page faults per step, per layer."""
    dtype, layout = MODES[mode]
    layout = layout if len(shape) == 4 else torch.contiguous_format
    x = torch.randn(shape, device=device).to(dtype=dtype, memory_format=layout).requires_grad_()
    grad = torch.randn_like(x)
    context = torch.arange(shape[0], device=device) % 2
    built = {name: (layer.to(memory_format=layout), backend)
             for name, (layer, backend) in layers(shape[1], device, backends, components).items()}
    times: dict[str, list[float]] = {name: [] for name in built}
    faults: dict[str, list[int]] = {name: [] for name in built}
    for i in range(repeats + 2):
        for name, (layer, backend) in built.items():
            # In training a norm layer's input arrives from the layer before it, in cache:
            # every layer starts with x and the gradient just read, whatever ran before it.
            x.detach().sum(), grad.sum()
            if device == "cuda":
                torch.cuda.synchronize()
            faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            with on_backend(backend), torch.autocast(x.device.type, torch.bfloat16, enabled=dtype == torch.bfloat16):
                step(layer, x, grad, context)
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= 2:  # the first two are warm-up (kernel build, allocator)
                times[name].append(time.perf_counter() - start)
                faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before)
            x.grad = None
    return ({name: statistics.median(t) for name, t in times.items()},
            {name: statistics.median(f) for name, f in faults.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--backends", nargs="+", choices=["torch", "compiled", "triton"], default=None,
                        help="time every mixture layer on each of these backends")
    parser.add_argument("--mode", default="fp32-nchw", choices=list(MODES))
    parser.add_argument("--tau-cache-mib", type=float, default=None,
                        help="the compiled kernel's τ cache (default: backends.TAU_CACHE_BYTES)")
    parser.add_argument("--components", type=int, nargs="+", default=[], metavar="K",
                        help="also time a UAN layer with each of these K (rows uan_k<K>): what a component costs")
    cpu_memory.add_option(parser)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/norm_speed.json"))
    args = parser.parse_args()
    kept = args.device == "cpu" and cpu_memory.kept(args)
    if args.tau_cache_mib is not None:
        kernel.TAU_CACHE_BYTES = int(args.tau_cache_mib * 2**20)
    rows = []
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else None
    peak = next((gbs for key, gbs in PEAK_GBS.items() if gpu and key in gpu), None)
    for shape in SHAPES:
        medians, faults = measure(shape, args.device, args.repeats, args.backends, args.mode, args.components)
        moved = 4 * math.prod(shape) * MODES[args.mode][0].itemsize  # x, y, ∂L/∂y, ∂L/∂x
        bandwidth = {k: moved / v / 1e9 for k, v in medians.items()}
        rows.append({"shape": list(shape), "median_s": medians, "median_page_faults": faults,
                     "ratio_to_bn": {k: v / medians["bn"] for k, v in medians.items()},
                     "effective_gbs": bandwidth,
                     "fraction_of_peak": {k: v / peak for k, v in bandwidth.items()} if peak else None})
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": args.device, "gpu": gpu,
              "peak_gbs": peak,
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
              "cpu_kernel": kernel.kernel_available(), "mode": args.mode,
              "tau_cache_bytes": kernel.TAU_CACHE_BYTES, "freed_memory_kept": kept, "repeats": args.repeats, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    names = list(rows[0]["median_s"])
    print(f"{'shape':<20}" + "".join(f"{n + ' ms':>12}" for n in names) + "".join(f"{n + '/bn':>11}" for n in names[1:]))
    for row in rows:
        print(f"{str(tuple(row['shape'])):<20}" + "".join(f"{row['median_s'][n] * 1e3:>12.2f}" for n in names)
              + "".join(f"{row['ratio_to_bn'][n]:>11.2f}" for n in names[1:]))
    print("effective GB/s (x, y, dy, dx): " + "; ".join(
        f"{tuple(row['shape'])} " + ", ".join(f"{n} {row['effective_gbs'][n]:.0f}" for n in names) for row in rows))
    print("page faults per step (median): " + "; ".join(
        f"{tuple(row['shape'])} " + ", ".join(f"{n} {row['median_page_faults'][n]:.0f}" for n in names) for row in rows))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
