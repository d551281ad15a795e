"""User errors versus bugs, and the ``python -m`` entry wrapper that tells them apart.

A :class:`UserError` is a mistake in what the user passed (a missing path, the wrong kind of file,
``--device cuda`` without a GPU, a bad config key). Library functions raise it like any exception, so
code that calls ``main()`` as a function (tests, notebooks, the demo) sees it and can catch it. Only
the command-line edge, :func:`run_cli`, turns it into one line on stderr and exit status 2; every other
exception is a bug and keeps its traceback.
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
