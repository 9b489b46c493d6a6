"""Mutation check: do the fast tests notice when AdaMatch's step or a norm layer's maths is broken?

    python benchmarks/mutation_check.py [--only NAME ...] [--out benchmarks/results/mutation_check.json]

Each mutant is a one-line change to ``methods/adamatch.py`` or the norm layers (swap the target's
weak and strong views, skip distribution alignment, ``>=`` → ``>`` in the mask, …). The script
applies one mutant at a time to a scratch copy of the repository (the work tree is never
touched), runs the tests that cover it (``-x``, the torch-ops backend where the compiled kernel is
not mutated), and records whether they failed (the mutant is killed) or passed (it survived).
The summary, per mutant its file, the change, the tests run, the verdict and the seconds taken,
goes to the JSON file and is printed as a table. Every mutant must be killed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ADAMATCH, TORCH_OPS = "adamatch_uan/methods/adamatch.py", "adamatch_uan/norm/backends/torch_ops.py"
METHOD_TESTS = ["tests/test_adamatch.py"]
NORM_TESTS = ["tests/test_torch_ops.py", "tests/test_mixture.py", "tests/test_uan.py", "tests/test_mn.py"]


@dataclass
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: list[str]


MUTANTS = [
    Mutant("swap the target's weak and strong views", ADAMATCH,
           "target_weak, target_strong = target_logits[:U], target_logits[U:]",
           "target_strong, target_weak = target_logits[:U], target_logits[U:]", METHOD_TESTS),
    Mutant("skip distribution alignment", ADAMATCH, "            if hp.align:", "            if False:", METHOD_TESTS),
    Mutant(">= becomes > in the mask", ADAMATCH, "mask = (confidence >= threshold).float()",
           "mask = (confidence > threshold).float()", METHOD_TESTS),
    Mutant("mask from the unaligned probabilities", ADAMATCH, "mask = (confidence >= threshold).float()",
           "mask = (target_weak.softmax(1).max(1).values >= threshold).float()", METHOD_TESTS),
    Mutant("threshold from the strong source view", ADAMATCH,
           "relative_threshold(source_weak, hp.tau, global_mean)",
           "relative_threshold(source_strong, hp.tau, global_mean)", METHOD_TESTS),
    Mutant("drop the source-only pass from the interpolation", ADAMATCH,
           "return interpolate_logits(source_combined, source_only), target_logits, gap",
           "return source_combined, target_logits, gap", METHOD_TESTS),
    Mutant("drop μ(t)", ADAMATCH, "loss = loss_source + mu * loss_target", "loss = loss_source + loss_target",
           METHOD_TESTS),
    Mutant("no ½ on the source terms", ADAMATCH, "loss_source = 0.5 * (", "loss_source = 1.0 * (", METHOD_TESTS),
    Mutant("soft labels despite hard_labels", ADAMATCH, "targets = pseudo if hp.hard_labels else target_probs",
           "targets = target_probs", METHOD_TESTS),
    Mutant("cross-entropy on the weak target view", ADAMATCH,
           "F.cross_entropy(target_strong, targets, reduction=\"none\")",
           "F.cross_entropy(target_weak, targets, reduction=\"none\")", METHOD_TESTS),
    Mutant("alignment ratio inverted", ADAMATCH,
           "aligned = target_probs * (eps + source_mean) / (eps + target_mean)",
           "aligned = target_probs * (eps + target_mean) / (eps + source_mean)", METHOD_TESTS),
    Mutant("source-only pass updates the running statistics", ADAMATCH, "            with frozen_stats(self.model):",
           "            with torch.enable_grad():", METHOD_TESTS),
    Mutant("uncentred δ²", TORCH_OPS, "return shift + m1, (m2 - m1 * m1).clamp_min(0)",
           "return shift + m1, m2.clamp_min(0)", NORM_TESTS),
    Mutant("λ^(+½) instead of λ^(-½)", TORCH_OPS, "return t.gamma * torch.exp(-0.5 * log_weight)",
           "return t.gamma * torch.exp(0.5 * log_weight)", NORM_TESTS),
    Mutant("running δ² without the n/(n − 1) correction", TORCH_OPS,
           "var.lerp_((stats.delta2 * count / (count - 1).clamp_min(1)).to(var.dtype), momentum)",
           "var.lerp_(stats.delta2.to(var.dtype), momentum)", NORM_TESTS),
    Mutant("UAN's λ floor ignored", TORCH_OPS,
           "weights = min_weight + (1 - K * min_weight) * torch.softmax(prior_logits, dim=1)",
           "weights = torch.softmax(prior_logits, dim=1)", NORM_TESTS),
]


def run_mutant(mutant: Mutant, scratch: Path) -> dict:
    """Apply ``mutant`` in ``scratch`` (a copy of the repository), run its tests, restore the file."""
    path = scratch / mutant.path
    original = path.read_text()
    if original.count(mutant.old) != 1:
        raise SystemExit(f"{mutant.name}: expected the line once in {mutant.path}, found it {original.count(mutant.old)} times")
    path.write_text(original.replace(mutant.old, mutant.new))
    started = time.monotonic()
    try:
        # The torch-ops backend: the compiled kernel does not run these Python lines.
        env_note = "ADAMATCH_UAN_KERNEL=0" if mutant.path == TORCH_OPS else ""
        command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-n", "2", *mutant.tests]
        env = {**os.environ, **({"ADAMATCH_UAN_KERNEL": "0"} if env_note else {})}
        done = subprocess.run(command, cwd=scratch, capture_output=True, text=True, timeout=1800, env=env)
    finally:
        path.write_text(original)
    failed = [line.split(" - ")[0].removeprefix("FAILED ") for line in done.stdout.splitlines()
              if line.startswith("FAILED")]
    return {"mutant": mutant.name, "file": mutant.path, "old": mutant.old, "new": mutant.new,
            "tests": mutant.tests, "environment": env_note, "killed": done.returncode != 0,
            "killed_by": failed[:3], "seconds": round(time.monotonic() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="names of mutants to run (default: all)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mutation_check.json"))
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    with tempfile.TemporaryDirectory() as folder:
        scratch = Path(folder) / "repo"
        shutil.copytree(ROOT, scratch, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "*.egg-info",
                                                                      "__pycache__", "benchmarks"))
        where = subprocess.run([sys.executable, "-c", "import adamatch_uan; print(adamatch_uan.__file__)"],
                               cwd=scratch, capture_output=True, text=True).stdout.strip()
        if not where.startswith(str(scratch)):
            raise SystemExit(f"the tests would import {where}, not the scratch copy's package")
        rows = []
        for mutant in chosen:
            rows.append(run_mutant(mutant, scratch))
            row = rows[-1]
            print(f"{'killed ' if row['killed'] else 'SURVIVED'}  {row['seconds']:>6.0f} s  {row['mutant']}"
                  + (f"  ({row['killed_by'][0]})" if row["killed_by"] else ""), flush=True)
    summary = {"command": "python benchmarks/mutation_check.py", "date": time.strftime("%Y-%m-%d"),
               "killed": sum(r["killed"] for r in rows), "mutants": len(rows), "rows": rows}
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{summary['killed']} of {summary['mutants']} mutants killed; written to {args.out}")
    if summary["killed"] != summary["mutants"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
