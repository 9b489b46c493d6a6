"""Evaluation rules on the same trained weights: each DA-sweep run's selected checkpoint tested again
under UAN's two inference rules and, where norm layers take a context, with the target test set
given the source or the target context id.

    python benchmarks/eval_rules.py --pair mnist_usps [--rows uan uan_momentum uan_ctx uan_ctx_momentum uan_input] [--seeds 0 1 2]
    python benchmarks/eval_rules.py --pair mnist_usps --aggregate-only

The rules change evaluation only, so one training run serves every rule and the comparison is
paired: the same weights, the same test images, nothing but the rule moves. It reads the run
directories ``benchmarks/da_table.py`` wrote (``runs/da_table/<pair>-<steps>steps/<row>-seed<seed>``,
with their ``results.json``), tests the checkpoint ``fit`` selected on *source* validation,
and writes one summary per run to ``benchmarks/results/eval_rules/<pair>-<steps>steps/``
(a run whose summary exists is skipped). The aggregate, per row and rule the target accuracy
(mean ± sample std over seeds) and its paired difference from the row's default rule, goes to
``benchmarks/results/eval_rules_<pair>-<steps>steps.{json,md}`` and is printed.

Rules: ``inference`` ∈ {learned, running} (UAN layers; the default is the layer's own) ×
``target context`` ∈ {source (0), target (1)} (context-aware layers; the default is the source id,
as the authors evaluate).
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import shutil
import statistics
import tempfile
from pathlib import Path

from da_table import RESULTS, ROOT, portable, publish

ROWS = ("uan", "uan_momentum", "uan_ctx", "uan_ctx_momentum", "uan_input")
CONTEXT_NAMES = {0: "source", 1: "target"}


def instantiate(spec: dict):
    """A ``{"class_path": ..., "init_args": {...}}`` entry of a run's config.yaml, built."""
    module, _, name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**spec.get("init_args", {}))


def rule_name(inference: str | None, context: int | None) -> str:
    parts = ([f"inference={inference}"] if inference else []) + \
        ([f"target context={CONTEXT_NAMES[context]}"] if context is not None else [])
    return ", ".join(parts) or "as trained"


def evaluate_rules(run_dir: Path, inferences: list[str] | None = None, contexts: list[int] | None = None) -> dict:
    """Test the selected checkpoint's evaluated (EMA) model under every combination of UAN inference rule
    (``inferences``; None: the one it has) and target-set context id (``contexts``; None: the one it has).

    Returns:
        {"model": the model (the last rule applied), "rules": {rule name: {"inference", "target_context",
        "test": {set: {"acc": ...}}}}, "default": the name of the rule the run itself tested}.
    """
    import lightning as L
    import yaml

    from adamatch_uan.norm import UAN
    from adamatch_uan.norm.context import uses_context

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    data = instantiate(config["data"])
    selected = json.loads((run_dir / "results.json").read_text())["checkpoint"]
    module, _, name = config["model"]["class_path"].rpartition(".")
    model = getattr(importlib.import_module(module), name).load_from_checkpoint(selected, map_location="cpu")
    uan_layers = [m for m in model.modules() if isinstance(m, UAN)]
    own_inference = uan_layers[0].inference if uan_layers else None
    target = model.eval_names.index("target")
    own_context = model.eval_contexts[target] if any(uses_context(m) for m in model.modules()) else None
    # The test hook writes confusion_matrices.json under the trainer's folder: a scratch one, not the run's.
    scratch = tempfile.mkdtemp()
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        default_root_dir=scratch)
    rules = {}
    for inference, context in itertools.product(inferences if uan_layers and inferences else [own_inference],
                                                contexts if own_context is not None and contexts else [own_context]):
        for layer in uan_layers:
            layer.inference = inference
        if context is not None:
            model.eval_contexts[target] = context
        tested = {k: v for d in trainer.test(model, datamodule=data, verbose=False) for k, v in d.items()}
        rules[rule_name(inference, context)] = {
            "inference": inference, "target_context": context,
            "test": {s: {"acc": tested[f"test/{s}/acc"], "f1": tested[f"test/{s}/f1"]} for s in model.eval_names}}
    shutil.rmtree(scratch, ignore_errors=True)
    return {"model": model, "rules": rules, "default": rule_name(own_inference, own_context)}


def summarise(run_dir: Path, pair: str, row: str, seed: int, steps: int) -> dict:
    tested = evaluate_rules(run_dir, ["learned", "running"], [0, 1])
    return {"pair": pair, "row": row, "seed": seed, "steps": steps, "run_dir": portable(str(run_dir)),
            "checkpoint": portable(json.loads((run_dir / "results.json").read_text())["checkpoint"]),
            "default": tested["default"], "rules": tested["rules"]}


def _mean_std(values: list[float]) -> dict:
    return {"values": values, "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def aggregate(summaries: list[dict]) -> dict:
    """row -> {"seeds", "default", "rules": {rule: {"target": mean/std/values, "minus_default": the paired
    difference from the default rule, mean/std/values}}}, over the seeds every rule of the row was tested at."""
    table: dict[str, dict] = {}
    for s in sorted(summaries, key=lambda s: (ROWS.index(s["row"]) if s["row"] in ROWS else len(ROWS), s["row"],
                                              s["seed"])):
        entry = table.setdefault(s["row"], {"seeds": [], "default": s["default"], "runs": []})
        entry["seeds"].append(s["seed"])
        entry["runs"].append(s)
    for entry in table.values():
        runs = entry.pop("runs")
        entry["rules"] = {}
        for rule in runs[0]["rules"]:
            target = [r["rules"][rule]["test"]["target"]["acc"] for r in runs]
            default = [r["rules"][entry["default"]]["test"]["target"]["acc"] for r in runs]
            source = [r["rules"][rule]["test"]["source"]["acc"] for r in runs]
            entry["rules"][rule] = {"target": _mean_std(target), "source": _mean_std(source),
                                    "minus_default": _mean_std([t - d for t, d in zip(target, default)])}
    return table


def markdown(table: dict, title: str) -> str:
    def pct(c: dict, signed: bool = False) -> str:
        sign = "+" if signed else ""
        text = f"{100 * c['mean']:{sign}.2f}" + (f" ± {100 * c['std']:.2f}" if len(c["values"]) > 1 else "")
        return text + " (" + ", ".join(f"{100 * v:{sign}.1f}" for v in c["values"]) + ")"

    lines = [f"**{title}**", "", "| row | seeds | rule | target acc % (each seed) | − default, points (each seed) | source acc % |",
             "|---|---|---|---|---|---:|"]
    for row, entry in table.items():
        for rule, c in entry["rules"].items():
            label = f"**{rule}** (default)" if rule == entry["default"] else rule
            lines.append(f"| {row} | {', '.join(map(str, entry['seeds']))} | {label} | {pct(c['target'])} | "
                         f"{pct(c['minus_default'], signed=True)} | {100 * c['source']['mean']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", required=True)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--runs", default=str(ROOT / "runs" / "da_table"), help="where da_table.py put the runs")
    parser.add_argument("--aggregate-only", action="store_true")
    args = parser.parse_args(argv)
    tag = f"{args.pair}-{args.steps}steps"
    out = RESULTS / "eval_rules" / tag
    if not args.aggregate_only:
        for seed in args.seeds:
            for row in args.rows:
                path, run_dir = out / f"{row}-seed{seed}.json", Path(args.runs) / tag / f"{row}-seed{seed}"
                if path.exists() or not (run_dir / "results.json").exists():
                    continue
                out.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(summarise(run_dir, args.pair, row, seed, args.steps), indent=1) + "\n")
    table = aggregate([json.loads(p.read_text()) for p in sorted(out.glob("*.json"))])
    publish(RESULTS / f"eval_rules_{tag}", table,
            markdown(table, f"{args.pair.replace('_', ' → ')} ({args.steps} steps): evaluation rules on the same weights"))
    return table


if __name__ == "__main__":
    main()
