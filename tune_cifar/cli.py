"""Shared command-line behaviour: bad input is one line on stderr and exit code 2; Ctrl-C exits
130 and SIGTERM 143 (what SLURM, Kubernetes and ``ray job stop`` send before a kill), each with one line."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from tune_cifar.errors import UsageError


class ArgumentParser(argparse.ArgumentParser):
    """argparse that exits 2 with one line (no usage dump) on a bad flag."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT), the shell's convention 128 + 2
EXIT_TERMINATED = 143  # SIGTERM, 128 + 15


class Terminated(BaseException):
    """SIGTERM, raised in the main thread as Python raises KeyboardInterrupt for SIGINT, so that
    ``finally`` blocks run (locks released, temporary files removed) before the process ends."""


def raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


def run(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> None:
    """Call ``main(argv)``; turn a :class:`UsageError` into ``error: ...`` and exit 2, Ctrl-C into
    exit 130 and SIGTERM into exit 143, each with one line on stderr."""
    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        code = main(argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except Terminated:
        print("terminated (SIGTERM)", file=sys.stderr)
        sys.exit(EXIT_TERMINATED)
    sys.exit(code or 0)


def python_command(*args: str | Path) -> str:
    """A shell command running this interpreter, for the commands a program prints.

    ``python`` in a fresh shell is often not the environment the project is installed in (the
    README's set-up makes ``.venv`` without activating it), so printed commands name the running
    interpreter: relative (``.venv/bin/python``) when it lives under the current folder.
    """
    python = Path(sys.executable)
    try:
        shown = str(python.relative_to(Path.cwd()))
    except ValueError:
        shown = str(python)
    return shlex.join([shown, *map(str, args)])


def require_writable(path: Path, flag: str) -> None:
    """Refuse, before any work, a folder that cannot be created or written: probe its nearest
    existing ancestor with a temporary folder (removed at once; root ignores permission bits,
    so only a real attempt tells)."""
    ancestor = Path(path).expanduser().absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"{flag} {path}: {ancestor} is a file, not a folder")
    try:
        Path(tempfile.mkdtemp(prefix=".tune-cifar-probe-", dir=ancestor)).rmdir()
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot write in {ancestor} ({exc.strerror})") from None
