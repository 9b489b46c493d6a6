"""How the command line reports a person's mistakes: one short message, exit status 2, no traceback.

A user error is a bad option, config key, value or file: the parser's errors, the
``ValueError`` our constructors raise while the command line builds the classes,
and ``DomainError`` (missing, corrupted or malformed data) whenever it comes. Anything else is
a programming error and raises as usual. ``--debug`` (or ``ADAMATCH_UAN_DEBUG=1``) shows the
traceback of a user error too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]  # adamatch_uan
# Lines of jsonargparse's union errors that repeat what the first lines say.
_NOISE = ("Does not validate against any of the", "Subtypes:", "Errors:", "Given value type:", "Given value:",
          "- Expected a <class 'NoneType'>")


class UserError(Exception):
    """A mistake in the command line, a config or the data; the message names the value and the fix."""


def raised_here(error: BaseException) -> bool:
    """Whether ``error`` was raised by this package's own code (its last traceback frame)."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE)


def our_message(error: BaseException) -> str | None:
    """The message of the outermost ValueError in ``error``'s cause chain raised by this package."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ValueError) and raised_here(error):
            return str(error)
        error = error.__cause__ or error.__context__
    return None


def condense(parser_message: str) -> str:
    """A parser error without the lines that restate the union's members."""
    lines = [line for line in parser_message.splitlines() if line.strip() and not line.strip().startswith(_NOISE)]
    return "\n".join(lines[:6])


def report(main: Callable[[list[str]], object], argv: list[str] | None = None,
           extra: dict[type[BaseException], int] | None = None) -> None:
    """Run ``main(argv)`` and turn a user error (or an exception type of ``extra``, with its status)
    into ``error: message`` on stderr and the exit status (2 for user errors)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("ADAMATCH_UAN_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    from adamatch_uan.data import DomainError  # the data's own error type, raised whenever data is read

    try:
        main(argv)
    except (UserError, DomainError) as error:
        if debug:
            raise
        print(f"error: {error}\n(--debug shows the traceback)", file=sys.stderr)
        raise SystemExit(2) from None
    except tuple(extra or {}) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(extra[type(error)]) from None
