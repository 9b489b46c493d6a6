"""``python -m adamatch_uan.evaluate RUN_DIR [--data.target SPEC] [--data.source SPEC] [--checkpoint ...] [--out FILE]``:
a finished run's metrics on labelled sets, as JSON.

Without ``--data`` options it tests the run's own test sets (the source's and, when labelled, the
target's), as ``fit`` did: the same images, batches, weights and context rule, so the numbers
equal ``results.json`` (unless the run limited its test batches; ``images`` says how many were
tested), in the precision the run was tested in (its ``config.yaml``). ``--recalibrate target`` tests the target with AdaBN's statistics (re-estimated on the
target's training images, no labels); ``--target_context 0|1`` with the source's or its own
context id (context-aware norms). ``--data.target SPEC`` (or ``--data.source``) tests that domain's test split instead,
made as ``fit`` would make it, its classes mapped onto the run's by name. For each set: accuracy,
macro precision, recall and F1, and the confusion matrix (rows: true class, columns: predicted),
written to ``--out`` (default ``RUN_DIR/evaluate-<time>.json``, never overwritten) and printed.
"""

from __future__ import annotations

import json
import tempfile
import time
from argparse import ArgumentError
from pathlib import Path

import yaml
from jsonargparse import ArgumentParser

from adamatch_uan.classifier import CHECKPOINT_CHOICES, find_checkpoint, load
from adamatch_uan.cli.errors import UserError, condense, report
from adamatch_uan.cli.console import METRICS, quiet_lightning, results_table
from adamatch_uan.data import load_domain, onto
from adamatch_uan.data.sharding import evaluation_loader


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m adamatch_uan.evaluate", exit_on_error=False, default_env=False,
                       description="A finished run's metrics on labelled sets, as JSON.")
    p.add_argument("run_dir", type=str, help="The run directory fit wrote.")
    p.add_argument("--data.source", type=str | None, default=None, help="Test this domain as the source set.")
    p.add_argument("--data.target", type=str | None, default=None, help="Test this domain as the target set.")
    p.add_argument("--data.root", type=str | None, default=None, help="Folder of built-in datasets (default: the run's).")
    p.add_argument("--checkpoint", type=str, default="best",
                   help=f"Which weights: {' or '.join(CHECKPOINT_CHOICES)} (the run's) or a .ckpt path.")
    p.add_argument("--target_context", type=int | None, default=None,
                   help="The context id target images get: 0, the source's (the UAN authors' rule), or 1, their own "
                        "(per-domain BatchNorm's); default: the run's.")
    p.add_argument("--recalibrate", type=str | None, default=None,
                   help="target: AdaBN, the target tested with running statistics re-estimated on its training images.")
    p.add_argument("--out", type=str | None, default=None, help="JSON file to write (default RUN_DIR/evaluate-<time>.json).")
    return p


def main(args: list[str] | None = None) -> dict:
    """Test and write the metrics; return them.

    Raises:
        UserError: bad options, a run without a checkpoint, an unlabelled or unreadable set, classes the
            run does not have, an existing --out.
    """
    try:
        config = parser().parse_args(args)
    except ArgumentError as error:
        raise UserError(f"{condense(str(error))}\n(python -m adamatch_uan.evaluate --help lists the options)") from error
    run = Path(config.run_dir)
    out = Path(config.out) if config.out else run / f"evaluate-{time.strftime('%Y%m%d-%H%M%S')}.json"
    if out.exists():
        raise UserError(f"{out} exists; choose another --out (nothing is ever overwritten)")
    classifier = load(run, config.checkpoint)
    run_config = yaml.safe_load((run / "config.yaml").read_text())
    data = run_config["data"]["init_args"]
    # Tested in the precision the run trained and tested in, so its own sets give its results.json.
    precision = str((run_config.get("trainer") or {}).get("precision") or "32-true")
    specs = {"source": config.data.source or data.get("source") or data.get("domain"),
             "target": config.data.target or data.get("target")}
    root = config.data.root or data.get("root", ".")
    sets, unlabelled = {}, []
    for name, spec in specs.items():
        if spec is None:
            continue
        domain = load_domain(spec, root, train=False, download=False, test_fraction=data.get("test_fraction", 0.2),
                             size=classifier.image_size, split_seed=data.get("split_seed", 0))
        if domain is None or domain.labels is None:
            unlabelled.append(f"{name} ({spec})")
            continue
        sets[name] = onto(domain, classifier.class_names)
    if not sets:
        raise UserError(f"Nothing to evaluate: {', '.join(unlabelled)} unlabelled; give a labelled set with "
                        f"--data.target SPEC")
    module = classifier.module
    if config.target_context is not None:
        if config.target_context not in (0, 1):
            raise UserError(f"Expected --target_context 0 (the source's) or 1 (the target's), got {config.target_context}")
        module.hparams.target_context = config.target_context
        module.eval_contexts = [config.target_context if n == "target" else c
                                for n, c in zip(module.eval_names, module.eval_contexts)]
    if config.recalibrate not in (None, "target"):
        raise UserError(f"Expected --recalibrate target (AdaBN) or nothing, got {config.recalibrate!r}")
    if config.recalibrate:
        if specs["target"] is None:
            raise UserError("--recalibrate target needs a target domain (--data.target SPEC)")
        adapted_to = load_domain(specs["target"], root, train=True, download=False, size=classifier.image_size,
                                 test_fraction=data.get("test_fraction", 0.2), split_seed=data.get("split_seed", 0))
        module.recalibrate_on(adapted_to.images, data.get("eval_batch_size", 256))
    own = dict(zip(module.eval_names, module.eval_contexts))
    names = list(sets)
    module.set_eval_sets(names, [own[n] if n in own else (module.hparams.target_context if n == "target" else 0)
                                 for n in names])
    batch_size = data.get("eval_batch_size", 256)
    loaders = [evaluation_loader(d.images, d.labels, batch_size) for d in sets.values()]
    with quiet_lightning(), tempfile.TemporaryDirectory() as scratch:  # the test hook writes its matrices there
        import lightning as L

        trainer = L.Trainer(accelerator="auto", devices=1, logger=False, enable_checkpointing=False, precision=precision,
                            enable_model_summary=False, enable_progress_bar=False, default_root_dir=scratch)
        tested = {k: v for d in trainer.test(module, dataloaders=loaders, verbose=False) for k, v in d.items()}
    results = {"run_dir": str(run), "checkpoint": str(find_checkpoint(run, config.checkpoint)),
               "test": {name: {"spec": specs[name], "images": len(domain),
                               **{m: tested[f"test/{name}/{m}"] for m in METRICS},
                               "confusion_matrix": module.confusion_matrices[name]}
                        for name, domain in sets.items()},
               "recalibrate": config.recalibrate, "target_context": module.hparams.target_context, "precision": precision,
               "unlabelled": unlabelled}
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("x") as f:
        json.dump(results, f, indent=2)
    print(results_table(results))
    for name in unlabelled:
        print(f"{name} is unlabelled: not scored")
    print(f"written to {out}")
    return results


def run() -> None:
    """``python -m adamatch_uan.evaluate``: ``main``, a user error ending in one short message and status 2."""
    report(main)


if __name__ == "__main__":
    run()
