"""The command line: ``python -m adamatch_uan.fit [--norm uan] [--config configs/x.yaml] [LightningCLI options]``.

A LightningCLI over the methods (``--model``, AdaMatch by default; ``Supervised`` for plain
classification) and the DataModules (``--data``, ``DomainPairDataModule`` by default;
``SingleDomainDataModule`` for one labelled domain): one entry point for both kinds of run, as
they share the run directory, checkpoints, callbacks and results. ``--norm NAME`` is a shortcut
for ``--model.init_args.norm NAME`` (``cli.arguments``); the data say what the model is built for
(the class count and names, the image size, the evaluation sets: linked arguments).

Each run writes to its own directory (``run_directory``: ``--run_dir``, default
``runs/<time>-<source>-<target>-<norm>``, never a directory that holds another run): the
resolved ``config.yaml`` (without the run directory, so it can start a new run), CSV and
TensorBoard logs, ``checkpoints/`` (last, best on the source validation accuracy — never target
labels — and one written if the run stops on an exception after training began, unless the
model then holds a NaN or Inf), ``predictions.csv`` for the target's training images, and at
the very end ``results.json``; a directory without ``results.json`` is an unfinished run. Every
run validates, and so saves a checkpoint, at its last step. ``--ckpt_path RUN/checkpoints/X.ckpt``
resumes a run in its directory, its history continued. The first non-finite loss or gradient
stops the run with a message naming the step, loss term and layers (``callbacks.NonFiniteGuard``),
and the command exits with status 1; Ctrl+C prints the checkpoint it wrote and the resume command.
``--trainer.sync_batchnorm true`` syncs every norm layer's statistics across processes under
DDP (``callbacks.MixtureSync``), not only BatchNorm's. With ``ADAMATCH_UAN_KEEP_FREED_MEMORY=1`` a CPU run
has malloc keep the memory torch frees instead of returning it to the OS (``cli.cpu_memory``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from argparse import ArgumentError
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerStatus

from adamatch_uan.cli import arguments, cpu_default, cpu_memory, run_directory
from adamatch_uan.callbacks.backend_report import BackendReport
from adamatch_uan.callbacks.elapsed import ElapsedTime
from adamatch_uan.callbacks.final_validation import FinalValidation
from adamatch_uan.callbacks.history import ContinuedSteps, HistoryLogger, continue_history
from adamatch_uan.callbacks.mixture_sync import MixtureSync
from adamatch_uan.callbacks.non_finite import FiniteExceptionCheckpoint, NonFiniteError, NonFiniteGuard
from adamatch_uan.callbacks.text_progress import TextProgress
from adamatch_uan.classifier import Classifier, Predictions
from adamatch_uan.cli.errors import UserError, condense, our_message, report
from adamatch_uan.cli.help import did_you_mean, option_names
from adamatch_uan.cli.console import METRICS, quiet_lightning, results_table
from adamatch_uan.methods import DomainAdaptationMethod
from adamatch_uan.models.slots import describe
from adamatch_uan.norm import list_norms


# The run directory the first process chose, for the processes Lightning's DDP launches (they run the
# same command again, and would otherwise choose a directory of their own, or refuse the first one's).
RUN_DIR_VARIABLE = "ADAMATCH_UAN_RUN_DIR"


class RunTrainer(L.Trainer):
    """Lightning's Trainer, its batch limits annotated whole number first: Lightning's ``float | int`` makes
    jsonargparse read ``--trainer.limit_val_batches 1`` (and a config's ``1``) as 1.0, every batch."""

    def __init__(self, *args, limit_train_batches: int | float | None = None, limit_val_batches: int | float | None = None,
                 limit_test_batches: int | float | None = None, limit_predict_batches: int | float | None = None,
                 **kwargs) -> None:
        super().__init__(*args, limit_train_batches=limit_train_batches, limit_val_batches=limit_val_batches,
                         limit_test_batches=limit_test_batches, limit_predict_batches=limit_predict_batches, **kwargs)


class RunConfig(SaveConfigCallback):
    """Saves the resolved config as ``RUN/config.yaml`` without ``run_dir`` and ``ckpt_path``: starting from
    it makes a new run (or, with ``--ckpt_path``, resumes the checkpoint's), never writes into this one."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.config = self.config.clone()
        self.config.run_dir = self.config.ckpt_path = None
        super().setup(trainer, pl_module, stage)


class FitCLI(LightningCLI):
    """LightningCLI with the --norm shortcut, a run directory, the data linked to the model, and results.json."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--norm", type=str | None, default=None,
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
        parser.set_defaults({"model": {"class_path": arguments.DEFAULT_MODEL},
                             "data": {"class_path": arguments.DEFAULT_DATA},
                             "trainer.max_steps": 10_000, "trainer.val_check_interval": 500,
                             "trainer.check_val_every_n_epoch": None, "trainer.log_every_n_steps": 10,
                             "trainer.enable_model_summary": False, "seed_everything": 0})

    def parse_arguments(self, parser, args) -> None:
        # jsonargparse keeps the default class's init_args when --model/--data (or a config) picks
        # another class, so Supervised would inherit AdaMatch's lr, EMA and flips. A first parse finds
        # the chosen classes; with them as the defaults, the second gives each class its own defaults
        # under what the user set; then --print_config prints what a run would get.
        argv = list(sys.argv[1:] if args is None else args)
        printing = [a for a in argv if a.split("=")[0] == "--print_config"]
        argv = [a for a in argv if a not in printing]
        self.config = parser.parse_args(argv)
        chosen = {key: self.config[key].class_path for key in ("model", "data")}
        if any(parser.get_defaults()[key].class_path != path for key, path in chosen.items()):
            parser.set_defaults({key: {"class_path": path} for key, path in chosen.items()})
            self.config = parser.parse_args(argv)
        if printing:
            ckpt_path = self.config.ckpt_path
            resumed = (run_directory.checkpoint_run(ckpt_path) or Path(ckpt_path).parent) if ckpt_path else None
            cpu_default.resolve(self.config.trainer, self.config.model.init_args, resumed)
            print(parser.dump(self.config, skip_unset=False), end="")
            raise SystemExit(0)

    def before_instantiate_classes(self) -> None:
        config = self.config
        if config.norm is not None:  # a config file's top-level norm:
            if config.norm not in list_norms():
                raise UserError(f"Expected a norm name in {{{', '.join(list_norms())}}}, got {config.norm!r}")
            config.model.init_args.norm = config.norm
        data = config.data.init_args
        domains = [getattr(data, key, None) for key in ("domain", "source", "target")]
        norm = describe(config.model.init_args.norm).replace("=", "-").replace(",", "+")
        name = "-".join([*(str(s).split(":")[0] for s in domains if s is not None), norm])
        if os.environ.get(RUN_DIR_VARIABLE) and os.environ.get("LOCAL_RANK", "0") != "0":
            config.run_dir = os.environ[RUN_DIR_VARIABLE]  # a process Lightning launched for DDP: the first one's
        elif config.trainer.fast_dev_run:  # Lightning's debugging mode: the callbacks' files go to a scratch folder
            config.run_dir = tempfile.mkdtemp(prefix="fast_dev_run-")
        else:
            config.run_dir = str(run_directory.choose(config.run_dir, config.ckpt_path, name))
        os.environ[RUN_DIR_VARIABLE] = config.run_dir  # inherited by the processes DDP launches
        self.cpu_default = cpu_default.resolve(config.trainer, config.model.init_args,
                                               Path(config.run_dir) if config.ckpt_path else None)
        config.trainer.default_root_dir = config.run_dir
        self.save_config_kwargs["config_filename"] = "config.yaml"

    def instantiate_trainer(self, **kwargs):
        # Read the data now, before the trainer's start-up lines: a missing or malformed file is then
        # the only thing the user sees (setup is idempotent; fit's own call finds the data loaded).
        self.datamodule.prepare_data()
        self.datamodule.setup("fit")
        run = Path(self.config.run_dir)
        kwargs["logger"] = [HistoryLogger(run, name="", version=""), TensorBoardLogger(run, name="", version="")]
        checkpoints = run / "checkpoints"
        # Lightning's save_last writes last.ckpt only when a best checkpoint is saved: a second callback,
        # without a monitor, writes last.ckpt at every validation instead.
        extra = [ModelCheckpoint(checkpoints, filename="best-{step}", monitor="val/source/acc", mode="max"),
                 ModelCheckpoint(checkpoints, filename="last", enable_version_counter=False),
                 FiniteExceptionCheckpoint(checkpoints), NonFiniteGuard(), BackendReport(), FinalValidation(),
                 ContinuedSteps(), ElapsedTime()]
        trainer_config = self._get(self.config_init, "trainer", default={})
        if not (sys.stdout.isatty() and trainer_config.get("enable_progress_bar", True) is not False):
            # A log file gets plain lines instead of a bar's \r frames.
            kwargs["enable_progress_bar"] = False
            extra.append(TextProgress())
        configured = trainer_config.get("callbacks") or []
        configured = configured if isinstance(configured, list) else [configured]
        kwargs["callbacks"] = [*configured, *extra]  # keyword callbacks would replace the configured ones
        if trainer_config.get("sync_batchnorm"):
            # Lightning's switch, for every norm layer: torch's conversion knows only BatchNorm (and no CPU).
            plugins = trainer_config.get("plugins") or []
            kwargs["plugins"] = [*(plugins if isinstance(plugins, list) else [plugins]), MixtureSync()]
            kwargs["sync_batchnorm"] = False
        return super().instantiate_trainer(**kwargs)


def _check_trainer(trainer: L.Trainer) -> None:
    if trainer.max_steps == 0:
        raise UserError("Expected --trainer.max_steps ≥ 1 (or -1: max_epochs decides), got 0")


def build(argv: list[str]) -> FitCLI:
    """Parse and build the run's classes (reading the data), or raise a UserError that names the mistake."""
    model_class, data_class = arguments.chosen_classes(argv)
    try:
        with quiet_lightning():
            return FitCLI(DomainAdaptationMethod, L.LightningDataModule, subclass_mode_model=True,
                          subclass_mode_data=True, run=False, args=arguments.rewrite(argv), trainer_class=RunTrainer,
                          auto_configure_optimizers=False,
                          save_config_callback=RunConfig, save_config_kwargs={"overwrite": True},
                          parser_kwargs={"default_env": False, "exit_on_error": False, "allow_abbrev": False})
    except ArgumentError as error:
        message = condense(str(error))
        named = [a.split("=")[0] for a in argv if a.startswith("--")]
        unknown = [a for a in named if a in message or f"'{a.rsplit('.', 1)[-1]}'" in message]
        hint = ""
        if unknown:
            last = unknown[0].rsplit(".", 1)[-1]
            hint = arguments.REMOVED.get(last) or did_you_mean(unknown[0], option_names(model_class, data_class))
        raise UserError(f"{message}{hint}\n(python -m adamatch_uan.fit --help lists the options)") from error
    except MisconfigurationException as error:  # the Trainer's own validation of its flags
        raise UserError(f"{str(error).splitlines()[0]} (python -m adamatch_uan.fit --help trainer lists its flags)") \
            from error
    except ValueError as error:  # the classes' own validation of what the user gave
        message = our_message(error)
        if message is None:
            raise
        raise UserError(message) from error


def main(args: list[str] | None = None) -> dict:
    """Train, test the best checkpoint, write ``results.json`` in the run directory; return the results.

    Raises:
        UserError: a bad option, config key or value (``cli.errors``); ``DomainError`` for bad data.
    """
    argv = list(sys.argv[1:] if args is None else args)
    page = arguments.help_page(argv)
    if page is not None:
        print(page)
        raise SystemExit(0)
    try:
        cli = build(argv)
        return _fit(cli)
    finally:
        os.environ.pop(RUN_DIR_VARIABLE, None)  # a later run in this process chooses its own


def _fit(cli: FitCLI) -> dict:
    """Train and test the run ``cli`` built (``main``)."""
    trainer, model, data, config = cli.trainer, cli.model, cli.datamodule, cli.config
    _check_trainer(trainer)
    run = Path(config.run_dir)
    if config.ckpt_path is not None:
        run_directory.check_checkpoint(config.ckpt_path, type(model), dict(model.hparams))
    new = not run.exists()
    if cpu_default.runs_on_cpu(trainer.accelerator):
        cpu_memory.from_environment()
    if trainer.is_global_zero and not trainer.fast_dev_run:
        print(f"run directory: {run}" + (f" (resuming from {config.ckpt_path})" if config.ckpt_path else ""), flush=True)
        if cli.cpu_default:
            print(cli.cpu_default, flush=True)
    try:
        with quiet_lightning():
            if config.ckpt_path is not None and trainer.is_global_zero:
                continue_history(run, _checkpoint_step(config.ckpt_path))
            trainer.fit(model, datamodule=data, ckpt_path=config.ckpt_path)
    except SystemExit:
        if trainer.state.status == TrainerStatus.INTERRUPTED and trainer.is_global_zero:
            _say_how_to_resume(run, trainer.global_step)
            raise SystemExit(130) from None
        raise
    except (UserError, ValueError):
        if new and trainer.global_step == 0 and run.is_dir():  # nothing trained: leave nothing behind
            shutil.rmtree(run, ignore_errors=True)
        raise
    return _test_and_report(cli, run)


def _checkpoint_step(path: str) -> int:
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=False).get("global_step", 0))


def _say_how_to_resume(run: Path, step: int) -> None:
    saved = run / "checkpoints" / "on_exception.ckpt"
    if saved.exists():
        print(f"\nInterrupted at step {step}; the run's state is in {saved}. Resume it with:\n"
              f"  python -m adamatch_uan.fit --config {run / 'config.yaml'} --ckpt_path {saved}", file=sys.stderr)
    else:
        print(f"\nInterrupted at step {step}, before any training: nothing to resume in {run}", file=sys.stderr)


def _test_and_report(cli: FitCLI, run: Path) -> dict:
    """Test the selected checkpoint, write predictions.csv and results.json, print the table."""
    trainer, model, data, config = cli.trainer, cli.model, cli.datamodule, cli.config
    checkpoint = trainer.checkpoint_callback
    best = checkpoint.best_model_path if checkpoint is not None and checkpoint.best_model_path else None
    with quiet_lightning():
        tested = trainer.test(model, datamodule=data, ckpt_path=best, verbose=False)
    merged = {k: v for d in tested for k, v in d.items()}
    # A spawned run (ddp_spawn) trains in child processes and hands back only the weights: the step count stays there.
    spawned = getattr(trainer.strategy, "_start_method", "popen") != "popen"
    # Images tested per set: all of it, unless --trainer.limit_test_batches cut it short.
    images = [min(len(loader.dataset), int(batches) * loader.batch_size * trainer.world_size)
              for loader, batches in zip(trainer.test_dataloaders, trainer.num_test_batches)]
    hp = data.hparams
    results = {
        "run_dir": str(run), "method": config.model.class_path, "norm": describe(model.hparams.norm),
        "data": {key: hp.get(key) for key in ("source", "target", "domain", "image_size", "split_seed", "seed")
                 if key in hp},
        "classes": model.class_names, "steps": None if spawned else trainer.global_step,
        "checkpoint": best, "selected": _selected(checkpoint), "commit": run_directory.commit(),
        "test": {name: {"images": count, **{m: merged[f"test/{name}/{m}"] for m in METRICS
                                           if f"test/{name}/{m}" in merged}}
                 for name, count in zip(model.eval_names, images)}}
    if not trainer.is_global_zero:  # under DDP every process gets here (ddp_spawn: the launching one)
        return results
    if trainer.fast_dev_run:  # Lightning's debugging mode writes nothing, and neither does fit
        print(results_table(results))
        shutil.rmtree(run, ignore_errors=True)
        return results
    target = getattr(data, "target_train", None)  # adaptation runs: the images the run adapted to
    if target is not None and config.predictions:
        probabilities = Classifier(model).probabilities(target.images, hp.eval_batch_size)
        results["predictions"] = str(Predictions(target.ids, probabilities, model.class_names)
                                     .write_csv(run / "predictions.csv", replace=True))
    partial = run / "results.json.partial"
    partial.write_text(json.dumps(results, indent=2))
    os.replace(partial, run / "results.json")  # a run dir has results.json only once finished
    print(results_table(results))
    if "target" not in results["test"] and target is not None:
        print(f"The target ({hp.target}) is unlabelled: only the source is scored."
              + (f" Predictions for its {len(target)} training images: {results['predictions']}"
                 if "predictions" in results else ""))
    print(f"run directory: {run}; results in {run / 'results.json'}")
    return results


def _selected(checkpoint: ModelCheckpoint | None) -> dict | None:
    """The selected checkpoint's step and validation score."""
    if checkpoint is None or not checkpoint.best_model_path:
        return None
    path = Path(checkpoint.best_model_path)
    step = int(path.stem.split("step=")[-1]) if "step=" in path.stem else None
    score = checkpoint.best_model_score
    return {"step": step, "monitor": checkpoint.monitor, "score": float(score) if score is not None else None}


def run() -> None:
    """``python -m adamatch_uan.fit``: ``main``, ending with one short message on stderr and status 2 for a
    user error (``--debug`` shows the traceback), status 1 when training diverges."""
    report(main, extra={NonFiniteError: 1})


if __name__ == "__main__":
    run()
