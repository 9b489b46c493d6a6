"""``fit --help``: about a screen (run options, the data module's and the method's arguments), the Trainer's
flags on their own page (``--help trainer``), and the option names a mistyped one is matched against.

The pages are made from the classes' signatures and their docstrings' ``Args`` (what jsonargparse
reads too), so they stay in step with the code; linked arguments (the class count, names, image
size and evaluation sets, which come from the data) are left out.
"""

from __future__ import annotations

import difflib
import inspect
import textwrap

import docstring_parser

# Arguments the data set on the model (fit.py links them): not options.
LINKED = ("num_classes", "class_names", "image_size", "eval_names")
WIDTH = 120


def arguments(cls: type, skip: tuple[str, ...] = ()) -> list[tuple[str, str, str]]:
    """(name, default, first sentence of its description) of each ``__init__`` argument of ``cls`` and the
    classes it passes ``**kwargs`` on to, in signature order."""
    found, seen = [], set(skip)
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass.__module__.startswith(("lightning", "torch", "builtins")):
            continue
        docs = {p.arg_name: p.description or "" for p in docstring_parser.parse(klass.__doc__ or "").params}
        for name, parameter in inspect.signature(klass.__init__).parameters.items():
            if name == "self" or parameter.kind in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL) or name in seen:
                continue
            seen.add(name)
            default = "" if parameter.default is inspect.Parameter.empty else repr(parameter.default)
            found.append((name, default, _plain(docs.get(name, ""))))
    return found


def _plain(description: str) -> str:
    """A docstring's description on one line, without reStructuredText's double backquotes."""
    return " ".join(description.replace("``", "").split()).rstrip(".")


def _section(title: str, prefix: str, rows: list[tuple[str, str, str]]) -> list[str]:
    """``title`` and one line per option: the name, what it does (cut to the page's width), the default."""
    lines = [title]
    column = max(len(f"  {prefix}{name}") for name, _, _ in rows) + 2
    for name, default, description in rows:
        option = f"  {prefix}{name}".ljust(column)
        tail = f" [{default}]" if default else ""
        room = max(WIDTH - len(option) - len(tail), 20)
        lines.append(option + textwrap.shorten(description, room, placeholder=" …") + tail)
    return lines


def short_help(model: type, data: type, norms: list[str]) -> str:
    """The page ``--help`` prints: run options, then the data module's and the method's arguments."""
    run = [("config", "", "a YAML config (configs/*.yaml); options after it override it"),
           ("norm", "", f"{', '.join(norms)}: the norm layers (--model.init_args.norm)"),
           ("run_dir", "", "the run's directory (default runs/<time>-<source>-<target>-<norm>); never reused"),
           ("ckpt_path", "", "resume from RUN_DIR/checkpoints/*.ckpt, in that run's directory"),
           ("predictions", "True", "write predictions.csv for the target's training images at the end"),
           ("seed_everything", "0", "the random seed"),
           ("print_config", "", "print the resolved config and exit"),
           ("debug", "", "show the traceback of a user error"),
           ("data CLASS / --model CLASS", "", "another data module or method (e.g. SingleDomainDataModule, Supervised)")]
    lines = ["usage: python -m adamatch_uan.fit [--config FILE] [--norm NAME] [--data.* ...] [--model.init_args.* ...]",
             "", *_section("Run:", "--", run), "",
             *_section(f"Data ({data.__name__}):", "--data.", arguments(data)), "",
             *_section(f"Method ({model.__name__}):", "--model.init_args.", arguments(model, skip=LINKED)), "",
             "Trainer: --trainer.max_steps, --trainer.val_check_interval, --trainer.precision, --trainer.devices, ...;",
             "  python -m adamatch_uan.fit --help trainer lists them all. Unset, the precision is bf16-mixed",
             "  (channels-last) on a CPU with bfloat16 instructions, else 32-true."]
    return "\n".join(lines)


def trainer_help() -> str:
    """The page ``--help trainer`` prints: every Trainer argument."""
    from lightning.pytorch import Trainer

    docs = {p.arg_name: p.description or "" for p in docstring_parser.parse(Trainer.__init__.__doc__ or "").params}
    rows = []
    for name, parameter in inspect.signature(Trainer.__init__).parameters.items():
        if name == "self":
            continue
        default = "" if parameter.default is inspect.Parameter.empty else repr(parameter.default)
        rows.append((name, default, _plain(docs.get(name, ""))))
    return "\n".join(["usage: python -m adamatch_uan.fit --trainer.NAME VALUE ...", "",
                      *_section("Trainer (lightning.pytorch.Trainer):", "--trainer.", rows)])


def option_names(model: type, data: type) -> list[str]:
    """Every option a command line may name (for "did you mean")."""
    from lightning.pytorch import Trainer

    trainer = [n for n in inspect.signature(Trainer.__init__).parameters if n != "self"]
    return ([f"--{n}" for n in ("config", "norm", "run_dir", "ckpt_path", "predictions", "seed_everything",
                                "print_config", "debug", "data", "model")]
            + [f"--data.{n}" for n, _, _ in arguments(data)]
            + [f"--model.init_args.{n}" for n, _, _ in arguments(model, skip=LINKED)]
            + [f"--trainer.{n}" for n in trainer])


def did_you_mean(option: str, names: list[str]) -> str:
    """" (did you mean --x?)" for the closest known option name, or ""."""
    close = difflib.get_close_matches(option, names, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""
