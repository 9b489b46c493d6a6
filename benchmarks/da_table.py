"""The domain-adaptation table: method × norm × seed through the real CLI, one run at a time, resumable.

    python benchmarks/da_table.py --pair mnist_usps --seeds 0 1 2 [--rows bn uan ...] [--steps 500] [--mode bf16-nhwc]
    python benchmarks/da_table.py --pair mnist_usps --aggregate-only
    python benchmarks/da_table.py --pair mnist_usps --guard fp32-nchw bf16-nhwc   # paired modes, same seeds

Each run is ``python -m adamatch_uan.fit --config configs/<pair>_<row>.yaml`` at the budget of
docs/RESULTS.md (batch 32 source + 96 target images, ``--steps`` steps with the schedules
spanning them, EMA 0.99, validation every 100 steps on 8 batches), seeded by
``--seed_everything`` and ``--data.seed`` (model, augmentations, validation split and
sampling all move with the seed). The test numbers are those of the checkpoint selected on
*source* validation accuracy (``fit``'s best checkpoint; target labels are never used to
select). ``--mode`` runs every cell in one precision and layout (``MODES``: the legacy table
has none; ``fp32-nchw`` and ``bf16-nhwc`` are today's code in float32 and in bf16 autocast with
channels-last), and ``--guard A B`` prints the paired per-seed difference B − A of each row's
target accuracy. Each run's summary is written to
``benchmarks/results/da_table/<pair>-<steps>steps[-<mode>][-confirmatory]/<row>-seed<seed>.json`` (committed, so
a sweep can span machines); a run whose summary exists is skipped, a run that was interrupted
resumes from its last checkpoint, a run that stopped on a non-finite loss is recorded as diverged. The aggregate, mean ± sample std over seeds and
every seed, with each row's per-seed difference from BN, goes to
``benchmarks/results/da_table_<tag>.{json,md}`` (the same folder name) and is printed.
``--confirmatory`` runs the confirmatory rows and retests at seeds 3–5 (``--rows`` a subset of
them) and adds UAN's paired differences from per-domain BN and AdaBN. A summary given a
``"paused"`` note (the cell was stopped, or shared the machine) keeps its steps to accuracy but
not its seconds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
USPS_NPZ = "USPS/usps_esl_16x16.npz"

ROWS = {  # row -> what it is (the config configs/<pair>_<row>.yaml holds it)
    "source_only": "source-only (BN), no adaptation",
    "bn": "AdaMatch + BN",
    "mn": "AdaMatch + MN (defaults: K = 2, var_floor = 0.1)",
    "mn_k3": "AdaMatch + MN, K = 3, var_floor = 0.01 (the defaults before 2026-12-03)",
    "uan": "AdaMatch + UAN (defaults: task-gradient fit, BatchNorm's rule)",
    "uan_momentum": "AdaMatch + UAN, momentum fit, the paper's rule (the defaults before 2026-12-03)",
    "uan_ctx": "AdaMatch + UAN, domain as context (defaults: task-gradient fit, BatchNorm's rule)",
    "uan_ctx_momentum": "AdaMatch + UAN, domain as context, momentum fit, the paper's rule (the defaults before 2026-12-03)",
    "uan_input": "AdaMatch + BN, UAN (K = 2, domain context) on the input image (the authors' layout)",
    "mn_online": "AdaMatch + MN, K = 3, var_floor = 0.01, τ from the running mixture (tau_from=\"running\", online EM)",
    "mn_k2": "AdaMatch + MN, K = 2, var_floor = 0.01",
    "mn_wide": "AdaMatch + MN, K = 3, var_floor = 0.1",
    "bn_ctx": "AdaMatch + per-domain BN (DSBN), each domain its own statistics",
    "gn": "AdaMatch + GroupNorm",
}
# Rows tested again from another row's checkpoints, without training: row -> (trained row, evaluate's options)
RETESTS = {
    "bn_ctx_source": ("bn_ctx", ["--target_context", "0"], "AdaMatch + per-domain BN, the target tested with the source's statistics"),
    "bn_adabn": ("bn", ["--recalibrate", "target"], "AdaMatch + BN, AdaBN (statistics re-estimated on the target's training images)"),
    "uan_adabn": ("uan", ["--recalibrate", "target"], "AdaMatch + UAN, AdaBN (running α, δ² re-estimated on the target's training images)"),
}
ROWS.update({row: text for row, (_, _, text) in RETESTS.items()})
# The confirmatory table (docs/METHOD.md, "Selection protocol"): trained rows, then the retests.
CONFIRMATORY_ROWS = ["source_only", "bn", "mn", "uan", "uan_ctx", "bn_ctx", "gn"]
CONFIRMATORY_SEEDS = [3, 4, 5]
REVIEWED, REVIEWED_AGAINST = ["uan", "uan_ctx", "uan_adabn"], ["bn_ctx", "bn_ctx_source", "bn_adabn"]
# docs/RESULTS.md's rows; the others on request
TABLE_ROWS = ["source_only", "bn", "mn", "mn_k3", "uan", "uan_momentum", "uan_ctx", "uan_ctx_momentum", "uan_input"]
PAIRS = {  # pair -> data arguments given the data root
    "mnist_usps": lambda root: ["--data.source", "mnist", "--data.target", f"npz:{Path(root) / USPS_NPZ}"],
    "usps_mnist": lambda root: ["--data.source", f"npz:{Path(root) / USPS_NPZ}", "--data.target", "mnist"],
}
METRICS = ("acc", "f1")
# The tables without a mode ran in float32 NCHW, the defaults of their day: named, so they still do.
LEGACY = ["--trainer.precision", "32-true"]
PRECISION_LAYOUT = {  # mode -> the fit arguments that make it (any method)
    "fp32-nchw": [*LEGACY, "--model.init_args.channels_last", "false"],
    "bf16-nhwc": ["--trainer.precision", "bf16-mixed", "--model.init_args.channels_last", "true"],
}
# In the DA table both modes also score the target's test set at each validation: a diagnostic for the
# time-to-accuracy curves that selection never reads.
MODES = {mode: [*arguments, "--data.val_target", "true"] for mode, arguments in PRECISION_LAYOUT.items()}
THRESHOLDS = (0.90, 0.95)  # target accuracies whose first step the table reports


def budget(steps: int) -> list[str]:
    return ["--data.batch_size", "32", "--trainer.max_steps", str(steps), "--trainer.val_check_interval", "100",
            "--trainer.limit_val_batches", "8", "--model.init_args.ema_decay", "0.99",
            "--trainer.enable_progress_bar", "false"]


def command(pair: str, row: str, seed: int, steps: int, data_root: str, run_dir: Path, mode: str | None = None) -> list[str]:
    return [sys.executable, "-m", "adamatch_uan.fit", "--config", str(Path("configs") / f"{pair}_{row}.yaml"),
            "--data.root", data_root, "--data.download", "false", *PAIRS[pair](data_root), *budget(steps),
            *(MODES[mode] if mode else LEGACY), "--seed_everything", str(seed), "--data.seed", str(seed),
            "--run_dir", str(run_dir)]


def portable(text: str) -> str:
    """``text`` with this checkout's paths made relative to it (``..`` for its parent, where
    ``../shared`` is): a committed summary names no machine's folders."""
    return text.replace(str(ROOT) + "/", "").replace(str(ROOT.parent) + "/", "../")


def commit() -> str | None:
    """The code's git commit (with "+dirty" for uncommitted changes outside the results), None outside a
    checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":!benchmarks/results"], cwd=ROOT,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def machine() -> str:
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {device}, "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def resume_arguments(run_dir: Path) -> list[str]:
    """``--ckpt_path`` of an interrupted run's latest checkpoint, so it goes on where it stopped; a run that
    never saved one starts again (its directory removed: it holds nothing to keep)."""
    if not run_dir.exists():
        return []
    saved = [run_dir / "checkpoints" / name for name in ("on_exception.ckpt", "last.ckpt")]
    saved = [p for p in saved if p.is_file()]
    if not saved:
        shutil.rmtree(run_dir)
        return []
    return ["--ckpt_path", str(max(saved, key=lambda p: p.stat().st_mtime_ns))]


def run_cell(path: Path, run_dir: Path, args: list[str], fields: dict,
             extra: Callable[[Path], dict] | None = None) -> dict:
    """One cell of a sweep: train and test through ``args`` (the CLI) unless the summary at ``path``
    exists; write and return the summary (``fields``, the command, time, machine, status, test
    metrics, and ``extra(run_dir)``). A run that stopped on a non-finite loss is "diverged"."""
    if path.exists():
        return json.loads(path.read_text())
    started = time.time()
    done, run_args = None, args
    if not (run_dir / "results.json").exists():
        run_args = args + resume_arguments(run_dir)
        print("+", " ".join(run_args), flush=True)
        done = subprocess.run(run_args, cwd=ROOT, capture_output=True, text=True)
    summary = {**fields, "command": portable(" ".join(["python", *args[1:]])),
               **({"command_resumed": portable(" ".join(["python", *run_args[1:]]))} if done is not None and run_args != args else {}),
               "minutes": round((time.time() - started) / 60, 2),
               "date": datetime.date.today().isoformat(), "machine": machine(), "commit": commit()}
    if (run_dir / "results.json").exists():
        results = json.loads((run_dir / "results.json").read_text())
        summary.update(status="finished", trained_steps=results["steps"], test=results["test"],
                       **(extra(run_dir) if extra else {}))
    elif done is not None and "Non-finite" in done.stderr:
        summary.update(status="diverged", error=done.stderr.strip().splitlines()[-12:])
    else:
        raise RuntimeError(f"{fields} failed (status {done.returncode if done else '?'}):\n"
                           f"{done.stderr[-3000:] if done else ''}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def publish(stem: Path, data: dict, text: str) -> None:
    """A sweep's aggregate as ``<stem>.json`` (``data``) and ``<stem>.md`` (``text``), and ``text`` printed."""
    stem.parent.joinpath(f"{stem.name}.json").write_text(json.dumps(data, indent=1) + "\n")
    stem.parent.joinpath(f"{stem.name}.md").write_text(text)
    print(text)


def target_curve(run_dir: Path) -> list[list[float]]:
    """[step, target accuracy of the EMA model, seconds since training started] at each validation that
    scored the target (``--data.val_target``), from the run's metrics.csv."""
    import csv

    accuracy, elapsed = {}, {}
    with (run_dir / "metrics.csv").open() as f:
        for row in csv.DictReader(f):
            step = int(row["step"]) + 1  # a validation after N steps is logged at step N − 1
            if row.get("val/target/acc"):
                accuracy[step] = float(row["val/target/acc"])
            if row.get("time/elapsed_s"):
                elapsed[step] = float(row["time/elapsed_s"])
    return [[step, acc, elapsed.get(step)] for step, acc in sorted(accuracy.items())]


def table_tag(pair: str, steps: int, mode: str | None, confirmatory: bool = False) -> str:
    """The folder name of a table's summaries and runs; the confirmatory table has its own, so that its
    aggregate never mixes in the exploratory seeds of the same mode."""
    return f"{pair}-{steps}steps" + (f"-{mode}" if mode else "") + ("-confirmatory" if confirmatory else "")


def run_one(pair: str, row: str, seed: int, steps: int, data_root: str, runs: Path, out: Path,
            mode: str | None = None, confirmatory: bool = False) -> dict:
    """Train and test one cell of the DA table (unless its summary exists) and return its summary."""
    runs = runs / table_tag(pair, steps, mode, confirmatory)
    run_dir = runs / f"{row}-seed{seed}"
    if row in RETESTS:
        return retest(pair, row, seed, steps, runs, out, mode)
    return run_cell(out / f"{row}-seed{seed}.json", run_dir, command(pair, row, seed, steps, data_root, run_dir, mode),
                    {"pair": pair, "row": row, "seed": seed, "steps": steps, **({"mode": mode} if mode else {})},
                    (lambda run: {"target_curve": target_curve(run)}) if mode else None)


def retest(pair: str, row: str, seed: int, steps: int, runs: Path, out: Path, mode: str | None) -> dict:
    """A row of ``RETESTS``: the trained row's selected checkpoint (in ``runs``, the table's run folder)
    tested again by the evaluate command with other options (no training), its summary written as a cell's."""
    path = out / f"{row}-seed{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    trained, options, _ = RETESTS[row]
    run_dir = runs / f"{trained}-seed{seed}"
    if not (run_dir / "results.json").exists():
        raise RuntimeError(f"{row} seed {seed} retests {run_dir}, which has not finished; run the row {trained} first")
    result = out / f"{row}-seed{seed}.evaluate.json"
    args = [sys.executable, "-m", "adamatch_uan.evaluate", str(run_dir), *options, "--out", str(result)]
    started = time.time()
    print("+", " ".join(args), flush=True)
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{row} seed {seed} failed:\n{done.stderr[-3000:]}")
    evaluated = json.loads(result.read_text())
    result.unlink()
    summary = {"pair": pair, "row": row, "seed": seed, "steps": steps, **({"mode": mode} if mode else {}),
               "retest_of": trained, "command": portable(" ".join(["python", *args[1:-2]])),
               "minutes": round((time.time() - started) / 60, 2), "date": datetime.date.today().isoformat(),
               "machine": machine(), "commit": commit(), "status": "finished",
               "test": {name: {m: v for m, v in metrics.items() if m in ("images", "acc", "precision", "recall", "f1")}
                        for name, metrics in evaluated["test"].items()}}
    path.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(summaries: Iterable[dict]) -> dict[str, dict]:
    """row -> {"seeds": [...], "diverged": [...], "<set>/<metric>": {"mean", "std", "values"}} over finished seeds.

    std is the sample standard deviation (n − 1), 0 for one seed; values are in seed order.
    """
    table: dict[str, dict] = {}
    for s in sorted(summaries, key=lambda s: (list(ROWS).index(s["row"]) if s["row"] in ROWS else len(ROWS),
                                              s["row"], s["seed"])):
        entry = table.setdefault(s["row"], {"seeds": [], "diverged": []})
        if s["status"] != "finished":
            entry["diverged"].append(s["seed"])
            continue
        entry["seeds"].append(s["seed"])
        for name, metrics in s["test"].items():
            for metric in METRICS:
                entry.setdefault(f"{name}/{metric}", {"values": []})["values"].append(metrics[metric])
    for entry in table.values():
        for key, cell in entry.items():
            if isinstance(cell, dict):
                cell["mean"], cell["std"] = _mean_std(cell["values"])
    return table


def time_to_accuracy(table: dict[str, dict], summaries: Iterable[dict]) -> None:
    """Add to each row with target curves ``"steps to <t>"``: per threshold of ``THRESHOLDS``, the first
    validation step (and its seconds) where the target accuracy reached it, for the seeds that did, in place.

    A summary with ``"paused"`` (why: the cell was stopped or shared the machine while it ran) keeps its
    steps but not its seconds: the wall time counts the pause."""
    curves: dict[str, dict[int, list]] = {}
    paused: dict[str, set[int]] = {}
    for s in summaries:
        if s.get("target_curve") and s.get("status") == "finished":
            curves.setdefault(s["row"], {})[s["seed"]] = s["target_curve"]
            if s.get("paused"):
                paused.setdefault(s["row"], set()).add(s["seed"])
    for row, by_seed in curves.items():
        if row not in table:
            continue
        for threshold in THRESHOLDS:
            reached = {seed: next(([step, t] for step, acc, t in curve if acc >= threshold), None)
                       for seed, curve in sorted(by_seed.items())}
            hits = [v for v in reached.values() if v is not None]
            timed = [v[1] for seed, v in reached.items() if v is not None and v[1] is not None
                     and seed not in paused.get(row, ())]
            table[row][f"steps to {threshold:.2f}"] = {
                "seeds": len(reached), "reached": len(hits), "per_seed": reached,
                "mean_steps": statistics.fmean(h[0] for h in hits) if hits else None,
                "mean_seconds": statistics.fmean(timed) if timed else None, "timed_seeds": len(timed)}


def paired_difference(table: dict[str, dict], baseline: str = "bn", key: str = "target/acc") -> None:
    """Add to every row of ``table`` but the baseline ``"<key> − <baseline>"``: the per-seed difference of
    ``key`` from the baseline's at the seeds both finished (the same seed gives both the same data split
    and sampling stream), with mean and sample std, in place."""
    if baseline not in table or key not in table[baseline]:
        return
    base = dict(zip(table[baseline]["seeds"], table[baseline][key]["values"]))
    for row, entry in table.items():
        if row == baseline or key not in entry:
            continue
        pairs = [(seed, value - base[seed]) for seed, value in zip(entry["seeds"], entry[key]["values"]) if seed in base]
        if pairs:
            mean, std = _mean_std([d for _, d in pairs])
            entry[f"{key} − {baseline}"] = {"seeds": [s for s, _ in pairs], "values": [d for _, d in pairs],
                                            "mean": mean, "std": std}


def cell(entry: dict, key: str, seeds: bool = False, signed: bool = False) -> str:
    """One aggregated metric as "mean ± std" in % ("mean" alone for one seed: it has no spread),
    with every seed's value when ``seeds`` and a sign on every number when ``signed`` (a difference)."""
    c = entry.get(key)
    if not c:
        return "—"
    sign = "+" if signed else ""
    text = f"{100 * c['mean']:{sign}.2f}" + (f" ± {100 * c['std']:.2f}" if len(c["values"]) > 1 else "")
    return text + (" (" + ", ".join(f"{100 * v:{sign}.1f}" for v in c["values"]) + ")" if seeds else "")


def reach(entry: dict, threshold: float) -> str:
    """"mean steps (reached/seeds)" to a target accuracy, "—" without curves."""
    c = entry.get(f"steps to {threshold:.2f}")
    if not c:
        return "—"
    return (f"{c['mean_steps']:.0f} ({c['reached']}/{c['seeds']})" if c["reached"] else f"not reached (0/{c['seeds']})")


def against_markdown(table: dict[str, dict], rows: Iterable[str], baselines: Iterable[str]) -> str:
    """Each of ``rows`` against each of ``baselines`` (``paired_difference`` already applied for them):
    target accuracy points, mean ± std of the per-seed differences and every seed."""
    rows = [r for r in rows if r in table]
    baselines = [b for b in baselines if b in table]
    lines = ["| row | " + " | ".join(f"− {b}, points (each seed)" for b in baselines) + " |",
             "|---|" + "---|" * len(baselines)]
    for row in rows:
        lines.append(f"| {row} | " + " | ".join(cell(table[row], f"target/acc − {b}", seeds=True, signed=True)
                                                 for b in baselines) + " |")
    return "\n".join(lines) + "\n"


def markdown(table: dict[str, dict], title: str) -> str:
    """The table as markdown: mean ± std in % and every seed, target first; steps to 90 % / 95 % target
    accuracy where the cells recorded curves."""
    curves = any(f"steps to {THRESHOLDS[0]:.2f}" in entry for entry in table.values())
    extra = "".join(f" steps to {100 * t:.0f} % (seeds) |" for t in THRESHOLDS) if curves else ""
    lines = [f"**{title}**", "",
             "| row | seeds | target acc % (each seed) | − BN, points (same seeds) | target macro F1 % | source acc % "
             "| diverged |" + extra,
             "|---|---|---|---|---:|---:|---|" + "---:|" * (len(THRESHOLDS) if curves else 0)]
    for row, entry in table.items():
        lines.append(f"| {ROWS.get(row, row)} | {', '.join(map(str, entry['seeds']))} | "
                     f"{cell(entry, 'target/acc', seeds=True)} | {cell(entry, 'target/acc − bn', seeds=True, signed=True)} | "
                     f"{cell(entry, 'target/f1')} | {cell(entry, 'source/acc')} | "
                     f"{', '.join(map(str, entry['diverged'])) or '—'} |"
                     + "".join(f" {reach(entry, t)} |" for t in THRESHOLDS if curves))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", choices=list(PAIRS), required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=None,
                        help=f"rows to run (default {TABLE_ROWS}; with --confirmatory, a subset of its rows)")
    parser.add_argument("--confirmatory", action="store_true",
                        help=f"the confirmatory table: rows {CONFIRMATORY_ROWS} and the retests, seeds {CONFIRMATORY_SEEDS}")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--runs", default=str(ROOT / "runs" / "da_table"), help="where run directories go")
    parser.add_argument("--aggregate-only", action="store_true", help="only aggregate the summaries there are")
    parser.add_argument("--mode", choices=list(MODES), default=None, help="precision and layout of every cell")
    parser.add_argument("--guard", nargs=2, choices=list(MODES), metavar=("A", "B"),
                        help="print the paired target-accuracy difference B − A per row and seed, and stop")
    args = parser.parse_args(argv)
    if args.guard:
        return guard(args.pair, args.steps, *args.guard)
    if args.confirmatory:
        rows = [*CONFIRMATORY_ROWS, *RETESTS]
        if args.rows and not set(args.rows) <= set(rows):
            parser.error(f"--rows {' '.join(sorted(set(args.rows) - set(rows)))}: not a confirmatory row; choose from {rows}")
        # A subset runs in the table's own order, so the retests still follow the rows they retest.
        args.rows = [r for r in rows if not args.rows or r in args.rows]
        args.seeds = CONFIRMATORY_SEEDS
    args.rows = args.rows or TABLE_ROWS
    tag = table_tag(args.pair, args.steps, args.mode, args.confirmatory)
    out = RESULTS / "da_table" / tag
    if not args.aggregate_only:
        for seed in args.seeds:  # seed-major: a sweep cut short still has every row for its first seeds
            for row in args.rows:
                run_one(args.pair, row, seed, args.steps, str(Path(args.data_root).resolve()), Path(args.runs), out,
                        args.mode, args.confirmatory)
    summaries = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    table = aggregate(summaries)
    paired_difference(table)
    time_to_accuracy(table, summaries)
    kind = f"confirmatory, seeds {', '.join(map(str, CONFIRMATORY_SEEDS))}" if args.confirmatory else "seeds as listed"
    text = markdown(table, f"{args.pair.replace('_', ' → ')} ({args.steps} steps{', ' + args.mode if args.mode else ''}, {kind})")
    if args.confirmatory:  # the question the reviewers asked: the mixture, or only the domain as context?
        for baseline in REVIEWED_AGAINST:
            paired_difference(table, baseline)
        text += "\nUAN against the reviewers' baselines, paired by seed:\n\n" + against_markdown(
            table, REVIEWED, REVIEWED_AGAINST)
    publish(RESULTS / f"da_table_{tag}", table, text)
    return table


def guard(pair: str, steps: int, first: str, second: str) -> dict:
    """Per row, the paired difference of target accuracy ``second`` − ``first`` at the seeds both modes
    finished (the same seed: the same data split, sampling stream and initial weights), its mean and
    sample std; written to ``benchmarks/results/da_guard_<pair>-<steps>steps.{json,md}``."""
    tables = {}
    for mode in (first, second):
        folder = RESULTS / "da_table" / table_tag(pair, steps, mode)
        tables[mode] = aggregate(json.loads(p.read_text()) for p in sorted(folder.glob("*.json")))
    rows = {}
    for row in tables[first]:
        if row not in tables[second]:
            continue
        a, b = (dict(zip(tables[m][row]["seeds"], tables[m][row]["target/acc"]["values"])) for m in (first, second))
        seeds = sorted(set(a) & set(b))
        if not seeds:
            continue
        diffs = [b[s] - a[s] for s in seeds]
        mean, std = _mean_std(diffs)
        rows[row] = {"seeds": seeds, first: [a[s] for s in seeds], second: [b[s] for s in seeds],
                     "difference": {"values": diffs, "mean": mean, "std": std},
                     "spread": {first: _mean_std([a[s] for s in seeds])[1], second: _mean_std([b[s] for s in seeds])[1]}}
    lines = [f"**{pair.replace('_', ' → ')}, {steps} steps: {second} against {first}, paired by seed**", "",
             f"| row | seeds | {first} target acc % | {second} target acc % | {second} − {first}, points (each seed) |"
             f" seeds' spread ({first}), points |", "|---|---|---|---|---|---:|"]
    for row, r in rows.items():
        cell_a = "; ".join(f"{100 * v:.1f}" for v in r[first])
        cell_b = "; ".join(f"{100 * v:.1f}" for v in r[second])
        d = r["difference"]
        lines.append(f"| {ROWS.get(row, row)} | {', '.join(map(str, r['seeds']))} | {cell_a} | {cell_b} | "
                     f"{100 * d['mean']:+.2f} ± {100 * d['std']:.2f} ({', '.join(f'{100 * v:+.1f}' for v in d['values'])}) | "
                     f"{100 * r['spread'][first]:.2f} |")
    text = "\n".join(lines) + "\n"
    publish(RESULTS / f"da_guard_{pair}-{steps}steps", rows, text)
    return rows


if __name__ == "__main__":
    main()
