"""The seed's first experiment: BN vs MN vs UAN (K = 3) in plain classification, norm × seed, resumable.

    python benchmarks/classify_table.py --dataset cifar10 --domain folder:../shared/data/CIFAR-10 \\
        --epochs 5 --seeds 0 1 [--norms bn mn uan uan_momentum] [--mode bf16-nhwc]

Each run is ``python -m adamatch_uan.fit --config configs/<dataset>_<norm>.yaml`` (the shallow
CNN, the Supervised recipe) for ``--epochs`` epochs, seeded by ``--seed_everything`` and
``--data.seed``; the tested checkpoint is the one selected on validation accuracy (a held-out
10 % of the training set; the test split is never used to select); ``--mode`` runs each in one
precision and layout (``da_table.PRECISION_LAYOUT``). Summaries go to
``benchmarks/results/classify/<dataset>-<epochs>epochs[-<mode>]/<norm>-seed<seed>.json`` (a run
whose summary exists is skipped, an interrupted one resumes from its latest checkpoint), the aggregate (mean ± sample std over seeds, every seed, and the
validation error per epoch) to ``benchmarks/results/classify_<dataset>-<epochs>epochs.{json,md}``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from da_table import LEGACY, PRECISION_LAYOUT, RESULTS, ROOT, aggregate, cell, publish, run_cell

NORMS = ("bn", "mn", "uan")  # the default rows; configs/<dataset>_<row>.yaml also holds uan_momentum, mn_k3


def command(dataset: str, norm: str, seed: int, epochs: int, domain: str | None, data_root: str,
            run_dir: Path, mode: str | None = None) -> list[str]:
    return [sys.executable, "-m", "adamatch_uan.fit", "--config", str(Path("configs") / f"{dataset}_{norm}.yaml"),
            "--data.root", data_root, "--data.download", "false", *(["--data.domain", domain] if domain else []),
            "--trainer.max_epochs", str(epochs), "--trainer.enable_progress_bar", "false",
            *(PRECISION_LAYOUT[mode] if mode else LEGACY),
            "--seed_everything", str(seed), "--data.seed", str(seed), "--run_dir", str(run_dir)]


def validation_curve(run_dir: Path) -> list[tuple[int, int, float]]:
    """(epoch, step, validation error) at each validation of a run (its metrics.csv)."""
    with (run_dir / "metrics.csv").open() as f:
        return [(int(r["epoch"]), int(r["step"]), 1 - float(r["val/source/acc"]))
                for r in csv.DictReader(f) if r.get("val/source/acc")]


def table_tag(dataset: str, epochs: int, mode: str | None) -> str:
    return f"{dataset}-{epochs}epochs" + (f"-{mode}" if mode else "")


def run_one(dataset: str, norm: str, seed: int, epochs: int, domain: str | None, data_root: str, runs: Path,
            out: Path, mode: str | None = None) -> dict:
    """Train and test one cell (unless its summary exists; resuming an interrupted one) and return its summary."""
    run_dir = runs / table_tag(dataset, epochs, mode) / f"{norm}-seed{seed}"
    return run_cell(out / f"{norm}-seed{seed}.json", run_dir,
                    command(dataset, norm, seed, epochs, domain, data_root, run_dir, mode),
                    {"dataset": dataset, "row": norm, "seed": seed, "epochs": epochs, **({"mode": mode} if mode else {})},
                    lambda run: {"validation_error": validation_curve(run)})


def markdown(table: dict, summaries: list[dict], title: str) -> str:
    """The table as markdown: test accuracy mean ± std and every seed, and the mean validation curve."""
    lines = [f"**{title}**", "", "| norm | seeds | test acc % (each seed) | test macro F1 % | validation error % per epoch (mean over seeds) |",
             "|---|---|---|---:|---|"]
    for norm, entry in table.items():
        curves = [s["validation_error"] for s in summaries if s["row"] == norm]
        by_epoch = [sum(c[i][2] for c in curves) / len(curves) for i in range(min(map(len, curves)))] if curves else []
        lines.append(f"| {norm} | {', '.join(map(str, entry['seeds']))} | {cell(entry, 'source/acc', seeds=True)} | "
                     f"{cell(entry, 'source/f1')} | {', '.join(f'{100 * e:.1f}' for e in by_epoch)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="cifar10", help="the configs/<dataset>_<norm>.yaml to run")
    parser.add_argument("--domain", default=None, help="--data.domain override, e.g. folder:../shared/data/CIFAR-10")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--norms", nargs="+", default=list(NORMS))
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--runs", default=str(ROOT / "runs" / "classify"))
    parser.add_argument("--aggregate-only", action="store_true")
    parser.add_argument("--mode", choices=list(PRECISION_LAYOUT), default=None, help="precision and layout of every run")
    args = parser.parse_args(argv)
    tag = table_tag(args.dataset, args.epochs, args.mode)
    out = RESULTS / "classify" / tag
    if not args.aggregate_only:
        for seed in args.seeds:
            for norm in args.norms:
                run_one(args.dataset, norm, seed, args.epochs, args.domain, args.data_root, Path(args.runs), out,
                        args.mode)
    summaries = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    table = aggregate(summaries)
    publish(RESULTS / f"classify_{tag}", table, markdown(table, summaries, f"{args.dataset}, shallow CNN, {args.epochs} epochs"))
    return table


if __name__ == "__main__":
    main()
