"""Where the compiled kernel's 2^f polynomial comes from, and how accurate it is in float32.

The kernel's softmax takes 2^u = 2^floor(u) * p(u - floor(u)) with p a degree-5 polynomial on [0, 1)
(``exp2_nonpositive`` in ``adamatch_uan/norm/backends/mixture_kernel.cpp``). This script fits p as the
minimax polynomial of the relative error max_f |p(f) / 2^f - 1| over [0, 1] with p(0) = 1 held exactly
(a linear programme on a dense grid, scipy's HiGHS), then evaluates the coefficients the kernel holds
as the kernel does, Horner's rule with one rounding to float32 per multiply-add, on every 2^-22th point
of [0, 1), against 2^f in float64.

    python benchmarks/exp2_polynomial.py --out benchmarks/results/exp2_polynomial.json
"""

from __future__ import annotations

import argparse
import json
import re
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from scipy.optimize import linprog

KERNEL = Path(__file__).resolve().parents[1] / "adamatch_uan" / "norm" / "backends" / "mixture_kernel.cpp"


def minimax(degree: int, points: int = 6000) -> tuple[np.ndarray, float]:
    """Coefficients c_0 = 1, c_1..c_degree minimising max_f |sum_i c_i f^i / 2^f - 1| on a grid of [0, 1]."""
    f = np.linspace(0.0, 1.0, points)
    w = np.exp2(-f)
    basis = f[:, None] ** np.arange(1, degree + 1) * w[:, None]
    target = 1.0 - w
    ones = np.ones((points, 1))
    rows = np.block([[basis, -ones], [-basis, -ones]])
    cost = np.zeros(degree + 1)
    cost[-1] = 1.0
    fit = linprog(cost, A_ub=rows, b_ub=np.concatenate([target, -target]), bounds=[(None, None)] * (degree + 1),
                  method="highs")
    return np.concatenate([[1.0], fit.x[:-1]]), float(fit.x[-1])


def kernel_coefficients(source: str) -> np.ndarray:
    """c_0..c_5 of the kernel's Horner expression (written highest degree first)."""
    body = source[source.index("MIX_INLINE V exp2_nonpositive"):]
    body = body[body.index("const auto poly"):body.index("};")]
    highest_first = [float(v.rstrip("f")) for v in re.findall(r"[0-9.]+e-?[0-9]+f|[0-9]+\.[0-9]*f", body)]
    return np.array(highest_first[::-1], dtype=np.float32)


def float32_error(coefficients: np.ndarray, step: float = 2.0 ** -22) -> float:
    """max |p(f) / 2^f - 1| over f = 0, step, 2 step, ... < 1, p evaluated as float32 multiply-adds."""
    f = np.arange(0.0, 1.0, step).astype(np.float32)
    p = np.full_like(f, coefficients[-1])
    for c in coefficients[-2::-1]:
        p = (p.astype(np.float64) * f + np.float64(c)).astype(np.float32)  # an FMA: one rounding
    return float(np.abs(p.astype(np.float64) / np.exp2(f.astype(np.float64)) - 1.0).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/exp2_polynomial.json"))
    args = parser.parse_args()
    fitted, bound = minimax(5)
    kernel = kernel_coefficients(KERNEL.read_text())
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/exp2_polynomial.py --out " + str(args.out),
        "fitted": [float(c) for c in fitted],
        "fitted_as_float32": [float(np.float32(c)) for c in fitted],
        "minimax_relative_error": bound,
        "kernel": [float(c) for c in kernel],
        "kernel_float32_relative_error": float32_error(kernel),
    }
    print("| coefficients | relative error |\n|---|---:|")
    print(f"| minimax fit, exact arithmetic | {bound:.2e} |")
    print(f"| the kernel's, float32 multiply-adds | {result['kernel_float32_relative_error']:.2e} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
