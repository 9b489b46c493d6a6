"""Choose one row's learning rate on *source* validation, at exploratory seeds, through the real CLI.

    python benchmarks/lr_select.py --pair mnist_usps --row gn --lrs 0.03 0.01 0.003 --seeds 0 --mode bf16-nhwc

Each cell is the DA table's run (``da_table.command``: the same budget, data and mode) with
``--model.init_args.lr`` set, summarised like a table cell (resumable, committed under
``benchmarks/results/lr_select/<pair>-<row>-<steps>steps[-<mode>]/lr<lr>-seed<seed>.json``). The
score of a learning rate is the source validation accuracy of its selected checkpoint (``fit``'s
best), averaged over the seeds; the highest wins. Target labels are read by nothing here: the
summaries keep the target test numbers only because every cell's summary does. The choice goes to
``benchmarks/results/lr_select_<pair>_<row>.{json,md}`` and is printed; a config then pins it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import da_table  # noqa: E402

RESULTS = da_table.RESULTS


def selected(run_dir: Path) -> dict:
    """The checkpoint ``fit`` selected on source validation: its step and score."""
    return {"selected": json.loads((run_dir / "results.json").read_text())["selected"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", choices=list(da_table.PAIRS), required=True)
    parser.add_argument("--row", choices=list(da_table.ROWS), required=True)
    parser.add_argument("--lrs", type=float, nargs="+", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--mode", choices=list(da_table.MODES), default=None)
    parser.add_argument("--data-root", default=str(da_table.ROOT.parent / "shared" / "data"))
    parser.add_argument("--runs", default=str(da_table.ROOT / "runs" / "lr_select"))
    args = parser.parse_args(argv)
    if set(args.seeds) & set(da_table.CONFIRMATORY_SEEDS):
        parser.error(f"--seeds {sorted(set(args.seeds) & set(da_table.CONFIRMATORY_SEEDS))}: the confirmatory "
                     f"seeds choose nothing; use exploratory seeds (not {da_table.CONFIRMATORY_SEEDS})")
    tag = f"{args.pair}-{args.row}-{args.steps}steps" + (f"-{args.mode}" if args.mode else "")
    out = RESULTS / "lr_select" / tag
    data_root = str(Path(args.data_root).resolve())
    scores = {}
    for seed in args.seeds:
        for lr in args.lrs:
            run_dir = Path(args.runs) / tag / f"lr{lr:g}-seed{seed}"
            cli = [*da_table.command(args.pair, args.row, seed, args.steps, data_root, run_dir, args.mode),
                   "--model.init_args.lr", f"{lr:g}"]
            fields = {"pair": args.pair, "row": args.row, "lr": lr, "seed": seed, "steps": args.steps, "mode": args.mode}
            summary = da_table.run_cell(out / f"lr{lr:g}-seed{seed}.json", run_dir, cli, fields, selected)
            # A diverged cell has no checkpoint worth selecting: it scores 0.
            scores.setdefault(lr, []).append(summary["selected"]["score"] if summary["status"] == "finished" else 0.0)
    table = {f"{lr:g}": {"seeds": args.seeds, "source_val_acc": values, "mean": statistics.fmean(values)}
             for lr, values in scores.items()}
    best = max(table, key=lambda lr: table[lr]["mean"])
    result = {"pair": args.pair, "row": args.row, "steps": args.steps, "mode": args.mode,
              "criterion": "source validation accuracy of the selected checkpoint, mean over seeds",
              "chosen_lr": float(best), "lrs": table}
    lines = [f"**{args.row} on {args.pair.replace('_', ' → ')} ({args.steps} steps{', ' + args.mode if args.mode else ''}): "
             f"learning rate by source validation accuracy**", "",
             "| lr | seeds | source val acc % (each seed) | mean |", "|---|---|---|---:|"]
    for lr, entry in table.items():
        lines.append(f"| {lr}{' (chosen)' if lr == best else ''} | {', '.join(map(str, args.seeds))} | "
                     f"{'; '.join(f'{100 * v:.1f}' for v in entry['source_val_acc'])} | {100 * entry['mean']:.1f} |")
    text = "\n".join(lines) + "\n"
    da_table.publish(RESULTS / f"lr_select_{args.pair}_{args.row}", result, text)
    return result


if __name__ == "__main__":
    main()
