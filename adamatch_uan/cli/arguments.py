"""What ``fit`` does with its command line before LightningCLI parses it.

- ``--help`` prints a page of about a screen (``cli.help.short_help``) for the chosen method and
  data module, ``--help trainer`` the Trainer's flags;
- options that would silently replace a part of the method's recipe are refused with the reason;
- ``--norm NAME`` (checked against the registry) becomes ``--model.init_args.norm NAME``, placed
  last so that it wins over a config file and ``--print_config`` shows it;
- the model's arguments that come from the data are refused, naming the data's.
"""

from __future__ import annotations

import importlib

from adamatch_uan.cli.errors import UserError
from adamatch_uan.cli.help import LINKED, short_help, trainer_help
from adamatch_uan.norm import list_norms

REFUSED = {
    "--optimizer": "the method's optimiser is part of its recipe (SGD with momentum, weight decay on conv/linear "
                   "weights only, a separate group for mixture parameters): set --model.init_args.lr, momentum, "
                   "weight_decay",
    "--lr_scheduler": "the method's learning-rate schedule is part of its recipe: set "
                      "--model.init_args.lr_schedule (adamatch, cosine, step) and lr_decay",
}
# Options a run no longer takes, and why.
REMOVED = {"num_classes": " (the class count comes from the data: the source's classes)",
           "resize": " (renamed: --data.image_size N)"}
DEFAULT_MODEL, DEFAULT_DATA = "adamatch_uan.methods.AdaMatch", "adamatch_uan.data.DomainPairDataModule"


def _split(argv: list[str]) -> list[tuple[str, str | None]]:
    """(option, value or None) pairs, ``--a=b`` and ``--a b`` alike (a value is what does not start with --)."""
    pairs, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and "=" in arg:
            pairs.append(tuple(arg.split("=", 1)))
        elif arg.startswith("--") and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            pairs.append((arg, argv[i + 1]))
            i += 1
        else:
            pairs.append((arg, None))
        i += 1
    return pairs


def _join(pairs: list[tuple[str, str | None]]) -> list[str]:
    return [item for option, value in pairs for item in ((option,) if value is None else (option, value))]


def _class(path: str | None, default: str) -> type:
    module, _, name = (path or default).rpartition(".")
    if not module:
        module = {DEFAULT_MODEL: "adamatch_uan.methods", DEFAULT_DATA: "adamatch_uan.data"}[default]
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise UserError(f"Unknown class {path!r} ({error})") from error


def chosen_classes(argv: list[str]) -> tuple[type, type]:
    """The method and data module classes the command line names (``--model``, ``--data``), or the defaults."""
    given = dict((o, v) for o, v in _split(argv) if o in ("--model", "--data"))
    return _class(given.get("--model"), DEFAULT_MODEL), _class(given.get("--data"), DEFAULT_DATA)


def help_page(argv: list[str]) -> str | None:
    """The help page asked for (``--help`` / ``-h``, ``--help trainer``), or None."""
    pairs = _split(argv)
    asked = [value for option, value in pairs if option in ("--help", "-h")]
    if not asked and not any(a in ("--help", "-h") for a in argv):
        return None
    if any(value == "trainer" for value in asked):
        return trainer_help()
    model, data = chosen_classes(argv)
    return short_help(model, data, list_norms())


def rewrite(argv: list[str]) -> list[str]:
    """The command line LightningCLI parses (module docstring).

    Raises:
        UserError: a refused option, or an unknown norm name.
    """
    pairs, norms = [], []
    for option, value in _split(argv):
        base = option.split(".")[0]
        if base in REFUSED:
            raise UserError(f"{option} is not an option of fit: {REFUSED[base]}")
        if option.startswith("--model.init_args.") and option.rsplit(".", 1)[-1] in LINKED:
            raise UserError(f"{option} comes from the data (the source's classes, its image size, the labelled "
                            f"sets): set the data instead, e.g. --data.image_size N")
        if option == "--norm":
            if value not in list_norms():
                raise UserError(f"Expected a norm name in {{{', '.join(list_norms())}}}, got {value!r}; use --norm NAME")
            norms.append(value)
        else:
            pairs.append((option, value))
    return _join(pairs) + (["--model.init_args.norm", norms[-1]] if norms else [])
