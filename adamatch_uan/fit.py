"""The command line: ``python -m adamatch_uan.fit [--norm uan] [--config configs/x.yaml] [LightningCLI options]``.

A LightningCLI over the methods (``--model``, AdaMatch by default; ``Supervised`` for plain
classification) and the DataModules (``--data``, ``DomainPairDataModule`` by default;
``SingleDomainDataModule`` for one labelled domain): one entry point for both kinds of run, as
they share the run directory, checkpoints, callbacks and results. ``--norm NAME`` is a shortcut for ``--model.init_args.norm NAME``,
written into the config before the classes are built, so YAML files can set the norm too.

Each run writes to its own directory (``--run_dir``, default ``runs/<time>-<source>-<target>-<norm>``):
the resolved ``config.yaml``, CSV and TensorBoard logs, ``checkpoints/`` (last, best on the
source validation accuracy — never target labels — and one written if the run stops on an
exception, unless the model then holds a NaN or Inf), and at the very end ``results.json`` with the test metrics per set; a directory
without ``results.json`` is an unfinished run. ``--ckpt_path PATH`` resumes a run. The first
non-finite loss or gradient stops the run with a message naming the step, loss term and
layers (``callbacks.NonFiniteGuard``), and the command exits with status 1.
``--trainer.sync_batchnorm true`` syncs every norm layer's statistics across processes under
DDP (``callbacks.MixtureSync``), not only BatchNorm's.
"""

from __future__ import annotations

import json
import os
import sys
import time
from argparse import ArgumentError, ArgumentTypeError
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from adamatch_uan.callbacks.backend_report import BackendReport
from adamatch_uan.classifier import Classifier, Predictions
from adamatch_uan.callbacks.mixture_sync import MixtureSync
from adamatch_uan.cli_errors import UserError, condense, our_message, report
from adamatch_uan.console import METRICS, results_table
from adamatch_uan.callbacks.non_finite import FiniteExceptionCheckpoint, NonFiniteError, NonFiniteGuard
from adamatch_uan.methods import DomainAdaptationMethod
from adamatch_uan.models.slots import describe
from adamatch_uan.norm import list_norms

def norm_name(value: str) -> str:
    """A registered norm name, checked when the command line is parsed."""
    if value not in list_norms():
        raise ArgumentTypeError(f"Expected a norm name in {{{', '.join(list_norms())}}}, got {value!r}; use --norm NAME")
    return value


class FitCLI(LightningCLI):
    """LightningCLI with the --norm shortcut, a run directory and results.json."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--norm", type=norm_name, default=None,
                            help=f"Shortcut for --model.init_args.norm ({', '.join(list_norms())}).")
        parser.add_argument("--run_dir", type=str | None, default=None,
                            help="Directory of this run (default: runs/<time>-<source>-<target>-<norm>).")
        parser.add_argument("--ckpt_path", type=str | None, default=None, help="Checkpoint to resume from.")
        parser.add_argument("--predictions", type=bool, default=True,
                            help="Write the selected model's predictions for the target's training images to "
                                 "RUN_DIR/predictions.csv at the end (adaptation runs).")
        # The data say what the model is built for: one class index, one image size, the sets it evaluates.
        for source, target in (("num_classes", "num_classes"), ("class_names", "class_names"),
                               ("input_size", "image_size"), ("eval_names", "eval_names")):
            parser.link_arguments(f"data.{source}", f"model.init_args.{target}", apply_on="instantiate")
        parser.set_defaults({"model": {"class_path": "adamatch_uan.methods.AdaMatch"},
                             "data": {"class_path": "adamatch_uan.data.DomainPairDataModule"},
                             "trainer.max_steps": 10_000, "trainer.val_check_interval": 500,
                             "trainer.check_val_every_n_epoch": None, "trainer.log_every_n_steps": 10,
                             "seed_everything": 0})

    def parse_arguments(self, parser, args) -> None:
        # jsonargparse keeps the default class's init_args when --model/--data (or a config) picks
        # another class, so Supervised would inherit AdaMatch's lr, EMA and flips. A first parse
        # (without --print_config, which would print and exit) finds the chosen classes; with them as
        # the defaults, the second parse gives each class its own defaults under what the user set.
        argv = list(sys.argv[1:] if args is None else args)
        probe = [a for a in argv if a.split("=")[0] != "--print_config"]
        self.config = parser.parse_args(probe)
        chosen = {key: self.config[key].class_path for key in ("model", "data")}
        changed = any(parser.get_defaults()[key].class_path != path for key, path in chosen.items())
        if changed:
            parser.set_defaults({key: {"class_path": path} for key, path in chosen.items()})
        if changed or len(probe) != len(argv):
            self.config = parser.parse_args(argv)

    def before_instantiate_classes(self) -> None:
        config = self.config
        if config.norm is not None:
            config.model.init_args.norm = config.norm
        if config.run_dir is None:
            data = config.data.init_args
            domains = [getattr(data, key, None) for key in ("domain", "source", "target")]
            stamp = time.strftime("%Y%m%d-%H%M%S")
            norm = describe(config.model.init_args.norm).replace("=", "-").replace(",", "+")
            name = "-".join([*(str(s).split(":")[0] for s in domains if s is not None), norm])
            config.run_dir = str(Path("runs") / f"{stamp}-{name}")
        run = Path(config.run_dir)
        config.trainer.default_root_dir = str(run)
        self.save_config_kwargs["config_filename"] = "config.yaml"

    def instantiate_trainer(self, **kwargs):
        # Read the data now, before the trainer's start-up lines: a missing or malformed file is then
        # the only thing the user sees (setup is idempotent; fit's own call finds the data loaded).
        self.datamodule.prepare_data()
        self.datamodule.setup("fit")
        run = Path(self.config.run_dir)
        kwargs["logger"] = [CSVLogger(run, name="", version=""), TensorBoardLogger(run, name="", version="")]
        checkpoints = run / "checkpoints"
        # Lightning's save_last writes last.ckpt only when a best checkpoint is saved: a second callback,
        # without a monitor, writes last.ckpt at every validation instead.
        extra = [ModelCheckpoint(checkpoints, filename="best-{step}", monitor="val/source/acc", mode="max"),
                 ModelCheckpoint(checkpoints, filename="last", enable_version_counter=False),
                 FiniteExceptionCheckpoint(checkpoints), NonFiniteGuard(), BackendReport()]
        configured = self._get(self.config_init, "trainer", default={}).get("callbacks") or []
        configured = configured if isinstance(configured, list) else [configured]
        kwargs["callbacks"] = [*configured, *extra]  # keyword callbacks would replace the configured ones
        trainer_config = self._get(self.config_init, "trainer", default={})
        if trainer_config.get("sync_batchnorm"):
            # Lightning's switch, for every norm layer: torch's conversion knows only BatchNorm (and no CPU).
            plugins = trainer_config.get("plugins") or []
            kwargs["plugins"] = [*(plugins if isinstance(plugins, list) else [plugins]), MixtureSync()]
            kwargs["sync_batchnorm"] = False
        return super().instantiate_trainer(**kwargs)


def main(args: list[str] | None = None) -> dict:
    """Train, test the best checkpoint, write ``results.json`` in the run directory; return the results.

    Raises:
        UserError: a bad option, config key or value (``cli_errors``); ``DomainError`` for bad data.
    """
    try:
        cli = FitCLI(DomainAdaptationMethod, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                     run=False, args=args, save_config_kwargs={"overwrite": True},
                     parser_kwargs={"default_env": False, "exit_on_error": False})
    except ArgumentError as error:
        raise UserError(f"{condense(str(error))}\n(python -m adamatch_uan.fit --help lists the options)") from error
    except ValueError as error:  # the classes' own validation of what the user gave
        message = our_message(error)
        if message is None:
            raise
        raise UserError(message) from error
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    trainer.fit(model, datamodule=data, ckpt_path=cli.config.ckpt_path)
    checkpoint = trainer.checkpoint_callback
    best = checkpoint.best_model_path if checkpoint is not None and checkpoint.best_model_path else None
    tested = trainer.test(model, datamodule=data, ckpt_path=best)
    merged = {k: v for d in tested for k, v in d.items()}
    # A spawned run (ddp_spawn) trains in child processes and hands back only the weights: the step count stays there.
    spawned = getattr(trainer.strategy, "_start_method", "popen") != "popen"
    # Images tested per set: all of it, unless --trainer.limit_test_batches cut it short.
    images = [min(len(loader.dataset), int(batches) * loader.batch_size * trainer.world_size)
              for loader, batches in zip(trainer.test_dataloaders, trainer.num_test_batches)]
    results = {"run_dir": cli.config.run_dir, "checkpoint": best, "steps": None if spawned else trainer.global_step,
               "test": {name: {"images": count, **{m: merged[f"test/{name}/{m}"] for m in METRICS
                                                  if f"test/{name}/{m}" in merged}}
                        for name, count in zip(model.eval_names, images)}}
    if trainer.is_global_zero:  # under DDP every process gets here (ddp_spawn: the launching one)
        run = Path(cli.config.run_dir)
        target = getattr(data, "target_train", None)  # adaptation runs: the images the run adapted to
        if target is not None and cli.config.predictions:
            probabilities = Classifier(model).probabilities(target.images, data.hparams.eval_batch_size)
            results["predictions"] = str(Predictions(target.ids, probabilities, model.class_names)
                                         .write_csv(run / "predictions.csv", replace=True))
            model.train()  # as the trainer left it
        partial = run / "results.json.partial"
        partial.write_text(json.dumps(results, indent=2))
        os.replace(partial, run / "results.json")  # a run dir has results.json only once finished
        print(results_table(results))
        if "target" not in results["test"] and target is not None:
            print(f"The target ({data.hparams.target}) is unlabelled: only the source is scored."
                  + (f" Predictions for its {len(target)} training images: {results['predictions']}"
                     if "predictions" in results else ""))
    return results


def run() -> None:
    """``python -m adamatch_uan.fit``: ``main``, ending with one short message on stderr and status 2 for a
    user error (``--debug`` shows the traceback), status 1 when training diverges."""
    report(main, extra={NonFiniteError: 1})


if __name__ == "__main__":
    run()
