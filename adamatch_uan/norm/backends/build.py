"""Building the compiled CPU kernel: ``python -m adamatch_uan.norm.backends.build`` builds it (or finds it built) and reports.

The kernel (``mixture_kernel.cpp``, ``mixture_ops.cpp``, ``mixture_kernel.h``) is built with
torch's ``cpp_extension`` and ninja into ``$ADAMATCH_UAN_CACHE/mixture-<key>`` (default
``~/.cache/adamatch_uan``) and loaded as a library of torch operators (``cpu_kernel.py``); the
key hashes everything that enters ``build.ninja`` and the binary: the sources, the flags, the
compiler's version, torch's version and include paths (each environment's own) and the CPU's
instruction set (``-march=native``), so two environments never share, nor fight over, a build.
Two things would otherwise rebuild it behind the user's back, so they are pinned:

- ninja compares each command line with its log, and those name the source files, so the
  sources are copied into the build folder first: every clone and checkout with the same
  key shares one build;
- the build uses the ``ninja`` package's own binary (first on ``PATH`` for the build only), not
  whichever ninja ``PATH`` finds first, whose log format may differ.

``ADAMATCH_UAN_KERNEL``: ``0`` never builds (the torch-ops backend), ``1`` makes a failed build an
error, unset: a failed build warns loudly (the cause and the fix) and the layers fall back to
torch ops. The first build takes about 3 minutes on a 2-core CPU.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

# The package is imported before this module in both ways it runs (imported lazily by cpu_kernel, or as
# `python -m ...backends.build`), so the dispatcher's limit is there to hand to the compiler.
from adamatch_uan.norm.backends import MAX_COMPONENTS

SOURCES = ("mixture_kernel.cpp", "mixture_ops.cpp")
HEADER = "mixture_kernel.h"
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros",
         "-fassociative-math", f"-DMIX_MAX_K={MAX_COMPONENTS}"]
FIX = ("Fix: install a C++ compiler (Debian: apt-get install g++) and run `python -m adamatch_uan.norm.backends.build` "
       "for the full error; ADAMATCH_UAN_KERNEL=0 chooses the torch-ops backend without this warning, "
       "ADAMATCH_UAN_KERNEL=1 makes a failed build an error.")


class KernelBuildError(RuntimeError):
    """The compiled CPU kernel could not be built; the message has the compiler's last words."""


def _source_dir() -> Path:
    return Path(__file__).parent


def _cpu_signature() -> str:
    # -march=native code must not be reused on a CPU with fewer instructions.
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return platform.machine() + flags


def _compiler_version() -> str:
    compiler = os.environ.get("CXX", "c++")
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return f"{compiler}: not found"


def _cpp_extension():
    """torch's ``cpp_extension``, imported without the CUDA_HOME warning a CUDA build of torch logs on a
    machine without a GPU (nothing here is CUDA)."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def _torch_paths() -> list[str]:
    """torch's include and library folders, which build.ninja names: one per environment."""
    return [*_cpp_extension().include_paths(), *_cpp_extension().library_paths()]


def build_key() -> str:
    """sha256 over the sources, the flags, the compiler's and torch's versions, torch's include and library
    paths and the CPU's flags (16 hex digits)."""
    text = b"".join((_source_dir() / name).read_bytes() for name in (*SOURCES, HEADER))
    extra = "\0".join([*FLAGS, _compiler_version(), torch.__version__, *_torch_paths(), _cpu_signature()])
    return hashlib.sha256(text + extra.encode()).hexdigest()[:16]


def build_directory(key: str | None = None) -> Path:
    cache = Path(os.environ.get("ADAMATCH_UAN_CACHE", Path.home() / ".cache" / "adamatch_uan"))
    return cache / f"mixture-{key or build_key()}"


@contextmanager
def _pinned_ninja():
    """The ``ninja`` package's binary first on PATH while building (falls back to PATH's without it)."""
    try:
        import ninja

        directory = ninja.BIN_DIR
    except (ImportError, AttributeError):
        directory = None
    old = os.environ.get("PATH", "")
    if directory:
        os.environ["PATH"] = os.pathsep.join([directory, old])
    try:
        yield
    finally:
        os.environ["PATH"] = old


def build(verbose: bool = False) -> str:
    """Build (or find built) the kernel's library and load it into this process (its operators join
    ``torch.ops.adamatch_uan``); return the library's path.

    Raises:
        KernelBuildError: a missing compiler or header, or a compile error.
    """
    cpp_extension = _cpp_extension()
    key = build_key()
    folder = build_directory(key)
    sources = folder / "src"
    try:
        sources.mkdir(parents=True, exist_ok=True)
        for name in (*SOURCES, HEADER):
            target = sources / name
            if not target.exists() or target.read_bytes() != (_source_dir() / name).read_bytes():
                shutil.copyfile(_source_dir() / name, target)
        with _pinned_ninja():
            return cpp_extension.load(f"adamatch_uan_mixture_{key}", [str(sources / n) for n in SOURCES],
                                      extra_cflags=FLAGS, extra_ldflags=["-fopenmp"], build_directory=str(folder),
                                      verbose=verbose, is_python_module=False)
    except Exception as error:  # a missing compiler, ninja or header, a compile error: say so
        raise KernelBuildError(f"Building the mixture kernel in {folder} failed: {str(error)[-2000:]}") from error


def load() -> str | None:
    """The kernel's library path (loaded), or None when ``ADAMATCH_UAN_KERNEL=0`` or (with a loud warning) a build fails.

    Raises:
        KernelBuildError: a failed build when ``ADAMATCH_UAN_KERNEL=1``.
    """
    policy = os.environ.get("ADAMATCH_UAN_KERNEL", "")
    if policy == "0":
        return None
    try:
        return build()
    except KernelBuildError as error:
        if policy == "1":
            raise
        warnings.warn(f"\n{'=' * 78}\nThe compiled mixture kernel is unavailable: MN and UAN layers on the CPU run on "
                      f"the torch-ops backend, 12-68x slower than BatchNorm.\nCause: {error}\n{FIX}\n{'=' * 78}",
                      stacklevel=2)
        return None


def main() -> None:
    """Build and report: where, how long, or why not (exit status 1)."""
    started = time.time()
    folder = build_directory()
    try:
        library = build(verbose="-v" in sys.argv)
    except KernelBuildError as error:
        print(f"error: {error}\n{FIX}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"mixture kernel ready: {library} ({time.time() - started:.1f} s; build folder {folder})")


if __name__ == "__main__":
    main()
