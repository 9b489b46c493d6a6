"""The mixture transform on the GPU against float64 on the CPU: y, ∂L/∂x and every parameter gradient.

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check_cuda.json]

For the four shapes of ``norm_speed.py``, K = 3, UAN's parametrisation with and without two
contexts and MN's (a given mixture), in float32 and under bfloat16 autocast: the CUDA run (the
dispatcher's backend: Triton when it imports) against the torch-ops backend in float64 on the
CPU from the same (rounded) input. Errors are max |got − want| / (max |want| + tiny) per tensor;
the tolerance is 1e-4 in float32 and 3e-2 under bfloat16 (its 8-bit mantissa on y). Exits 1 on
any failure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from adamatch_uan.norm import backends as kernel
from adamatch_uan.norm.mixture import LearnedMixture, Mixture, mixture_normalize

SHAPES = [(256, 64, 32, 32), (256, 128, 16, 16), (256, 128, 8, 8), (256, 256)]
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2}


def case(shape, kind: str, groups: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    c, k = shape[1], 3
    x = torch.randn(shape, generator=g) * 1.7 + 0.4
    dy = torch.randn(shape, generator=g)
    if kind == "uan":
        tables = [torch.randn(groups, k, c, generator=g), torch.randn(k, c, generator=g), torch.randn(k, c, generator=g)]
    else:
        tables = [torch.log_softmax(torch.randn(groups, k, c, generator=g), 1), torch.randn(k, c, generator=g),
                  torch.rand(k, c, generator=g) + 0.3]
    affine = [torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)]
    context = torch.arange(shape[0]) % groups if groups > 1 else None
    return x, dy, tables, affine, context


def run(x, dy, tables, affine, context, kind: str, device: str, dtype: torch.dtype, autocast: bool):
    x = x.to(device, dtype).requires_grad_(True)
    params = [t.to(device, dtype).requires_grad_(True) for t in tables + affine]
    mixture = (LearnedMixture(*params[:3], 0.01, 0.01) if kind == "uan" else Mixture(*params[:3]))
    ctx = context.to(device) if context is not None else None
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        y, _ = mixture_normalize(x, mixture, params[3], params[4], 1e-5, context=ctx)
    y.backward(dy.to(device, y.dtype))
    return [y.detach(), x.grad] + [p.grad for p in params]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_check_cuda.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check needs a CUDA device")
    names = ["y", "dx", "weight_param", "mu", "var_param", "gamma", "beta"]
    rows, failed = [], False
    for shape in SHAPES:
        for kind, groups in (("uan", 1), ("uan", 2), ("mn", 1)):
            for precision in ("float32", "bfloat16"):
                x, dy, tables, affine, context = case(shape, kind, groups)
                if precision == "bfloat16":
                    x = x.bfloat16().float()  # the reference sees the input the GPU sees
                want = run(x, dy, tables, affine, context, kind, "cpu", torch.float64, False)
                got = run(x, dy, tables, affine, context, kind, "cuda", torch.float32, precision == "bfloat16")
                errors = {n: float((g.double().cpu() - w).abs().max() / (w.abs().max() + 1e-30))
                          for n, g, w in zip(names, got, want)}
                ok = all(e <= TOLERANCE[precision] for e in errors.values())
                failed |= not ok
                rows.append({"shape": list(shape), "layer": kind, "contexts": groups, "precision": precision,
                             "backend": kernel.backend("cuda", 3), "errors": errors, "ok": ok})
                print(f"{str(shape):<20}{kind:<5}G={groups} {precision:<9}"
                      + " ".join(f"{n} {e:.1e}" for n, e in errors.items()) + ("  ok" if ok else "  FAIL"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                                    "rows": rows}, indent=2))
    print(f"written to {args.out}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
