"""User errors versus bugs, and the ``python -m`` entry wrappers that tell them apart.

A :class:`UserError` is a mistake in what the user passed (a missing path, the wrong kind of file,
``--device cuda`` without a GPU, a bad config key). Library functions raise it like any exception, so
code that calls ``main()`` as a function (tests, notebooks) sees it and can catch it. Only the
command-line edge, :func:`run_cli` or :func:`call_cli`, turns it into one line on stderr and exit
status 2; every other exception is a bug and keeps its traceback.

Every entry point the demo runs has ``cli(argv=None) -> int``, built on :func:`call_cli`: what
``python -m`` does with those arguments, returning the exit status instead of exiting (its
``__main__`` block is ``raise SystemExit(cli())``), so other Python code can run a command in-process.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

USER_ERROR_EXIT_CODE = 2  # what argparse uses for a bad command line


class UserError(Exception):
    """Something the user passed is wrong; the message names the problem and the fix on one line."""


class PathNotFoundError(UserError, FileNotFoundError):
    """A path the user passed does not exist."""

    def __init__(self, path: Any, hint: str = "") -> None:
        self.path = path
        super().__init__(f"{path} does not exist" + (f"; {hint}" if hint else ""))

    def __str__(self) -> str:  # FileNotFoundError would format (errno, strerror) otherwise
        return str(self.args[0])


def require_path(path: Any, what: str = "", hint: str = "") -> Any:
    """Return ``path`` if it exists, else raise :class:`PathNotFoundError` (``what`` names the flag)."""
    from pathlib import Path

    if not Path(path).expanduser().exists():
        prefix = f"{what}: " if what else ""
        raise PathNotFoundError(f"{prefix}{path}", hint)
    return path


def one_line(message: str) -> str:
    """Collapse a multi-line message so the user sees a single line."""
    parts = [part.strip() for part in str(message).splitlines() if part.strip()]
    return "; ".join(parts)


def run_cli(main: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``main``; a :class:`UserError` becomes ``error: <message>`` on stderr and exit status 2.

    Use it only under ``if __name__ == "__main__":``. Under ``torchrun`` every rank that hits the
    mistake prints the line; torchrun then reports the failed ranks.
    """
    try:
        return main(*args, **kwargs)
    except UserError as error:
        print(f"error: {one_line(str(error))}", file=sys.stderr, flush=True)
        raise SystemExit(USER_ERROR_EXIT_CODE) from None


def exit_status(exit_: SystemExit) -> int:
    """The status the interpreter exits with when ``exit_`` is not caught: ``None`` → 0, an int as it
    is, anything else (``SystemExit("message")``) printed to stderr → 1."""
    if exit_.code is None:
        return 0
    if isinstance(exit_.code, int):
        return exit_.code
    print(exit_.code, file=sys.stderr, flush=True)
    return 1


def call_cli(main: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Call ``main`` as ``python -m`` would and return the exit status instead of exiting.

    0 when ``main`` returns; 2 after one ``error:`` line for a :class:`UserError` (as :func:`run_cli`);
    for a ``SystemExit`` (argparse's ``--help`` → 0, a bad flag → 2 after its one line, an early
    ``raise SystemExit(0)``) the status the interpreter would exit with. Any other exception is a bug
    and propagates with its traceback, as it would end the process.
    """
    try:
        run_cli(main, *args, **kwargs)
    except SystemExit as exit_:
        return exit_status(exit_)
    return 0
