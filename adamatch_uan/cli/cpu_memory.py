"""Opt-in: freed memory stays with a CPU training process instead of going back to the OS at every free.

glibc's malloc serves a large block (over its mmap threshold: 128 KiB, rising with the blocks freed
to at most 32 MiB) with its own mmap and returns it with munmap when torch frees it, and gives the
heap's free top back too, so the next step's activations arrive as fresh pages that the kernel
faults in and zeroes 4 KiB at a time: thousands of page faults per layer and step. With mmap off
(``M_MMAP_MAX`` 0) and trimming only of a free heap top over 2 GiB (``M_TRIM_THRESHOLD``) every block
comes from the heap and stays there when freed.

It is opt-in: ``ADAMATCH_UAN_KEEP_FREED_MEMORY=1`` turns it on for a CPU ``fit``. The heap can grow
without bound where glibc's default would not: torch asks for 64-byte aligned blocks, and a freed
block that a small allocation made meanwhile hems in is too small for the same request plus its
alignment slack, so the heap grows by a block instead, at every repeat of the pattern (a probe that
frees a large tensor while a small one made beside it lives on grows by the large one's size each
time). Fits of 1000 steps did not grow, but a loop that keeps small tensors (a callback's log, say)
could. A preloaded caching allocator (tcmalloc, ``LD_PRELOAD``) keeps freed memory without that
failure; docs/RESULTS.md ("Page faults" and "Kept memory over a long run") has the costs and gains
of each. The benchmarks take ``--freed-memory keep``.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import sys

from adamatch_uan.cli.errors import UserError

VARIABLE = "ADAMATCH_UAN_KEEP_FREED_MEMORY"
# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Turn off glibc malloc's mmap blocks and heap trimming for the rest of this process (see the
    module docstring); whether it did (False off Linux/glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success.
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def from_environment() -> bool:
    """``keep_freed_memory()`` if ``ADAMATCH_UAN_KEEP_FREED_MEMORY=1``; whether freed memory is kept.

    Raises:
        UserError: the variable holds something other than 0 or 1.
    """
    value = os.environ.get(VARIABLE, "0")
    if value not in ("0", "1"):
        raise UserError(f"{VARIABLE}={value!r}: expected 1 (keep freed memory) or 0 (glibc's default, as when "
                        f"unset); set {VARIABLE}=1 to keep it, or unset it")
    return value == "1" and keep_freed_memory()


def add_option(parser: argparse.ArgumentParser) -> None:
    """``--freed-memory {release,keep}`` for a benchmark: glibc's default malloc (release, the default, which
    the benchmarks' earlier recorded commands ran) or kept freed memory (keep); ``kept(args)`` applies it."""
    parser.add_argument("--freed-memory", choices=["release", "keep"], default="release",
                        help="release: glibc's default; keep: malloc keeps freed blocks (ADAMATCH_UAN_KEEP_FREED_MEMORY=1)")


def kept(args: argparse.Namespace) -> bool:
    """Apply ``--freed-memory`` (``add_option``); whether freed memory is kept."""
    return args.freed_memory == "keep" and keep_freed_memory()
