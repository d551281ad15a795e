"""Command-line helpers shared by every entry point: one-line argparse errors and checked numeric types.

A bad command line is a user mistake like any other: one ``error:`` line naming the flag and exit
status 2 (:data:`utils.errors.USER_ERROR_EXIT_CODE`), not argparse's usage block.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import NoReturn

from utils.errors import USER_ERROR_EXIT_CODE, UserError


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose complaints are one ``error:`` line and exit status 2, like every other user mistake.

    Raising a :class:`UserError` here would change what ``main(argv)`` callers get for a bad command
    line (argparse's ``SystemExit``), so the line is printed here, as argparse itself does.
    """

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr, flush=True)
        raise SystemExit(USER_ERROR_EXIT_CODE)


def checked_number(kind: Callable[[str], float], check: Callable[[float], bool], requirement: str) -> Callable[[str], float]:
    """An argparse ``type`` converting with ``kind`` and refusing values that fail ``check``."""

    def convert(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                              f"got {text!r}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value

    convert.__name__ = kind.__name__  # argparse names the type in some messages
    return convert


positive_int = checked_number(int, lambda v: v >= 1, ">= 1")
non_negative_int = checked_number(int, lambda v: v >= 0, ">= 0")
non_negative_float = checked_number(float, lambda v: v >= 0, ">= 0")  # also refuses nan
top_p_float = checked_number(float, lambda v: 0 < v <= 1, "in (0, 1] (1 = off)")
positive_float = checked_number(float, lambda v: v > 0 and v != float("inf"), "a finite number > 0")


def parse_guidance_scale(text: str) -> float | tuple[float, float]:
    """The command line's guidance syntax: "4.0" → 4.0 (constant), "1.2,8.0" → (1.2, 8.0) (linear from 1.2
    to 8.0 over the generated codes, as the official sampler's flag writes it); ValueError otherwise.

    Library calls take the number or the tuple; only the command-line edge reads text.
    """
    parts = [part.strip() for part in str(text).split(",")]
    try:
        values = [float(part) for part in parts]
    except ValueError:
        raise ValueError(f"guidance scale must be 'S' or 'START,END' numbers, got {text!r}") from None
    if len(values) not in (1, 2):
        raise ValueError(f"guidance scale must be 'S' or 'START,END', got {text!r}")
    if not all(math.isfinite(value) for value in values):
        raise ValueError(f"guidance scales must be finite, got {text!r}")
    return values[0] if len(values) == 1 else (values[0], values[1])


def guidance_scale(text: str) -> float | tuple[float, float]:
    """argparse ``type`` of ``--cfg-scale``: :func:`parse_guidance_scale`, its complaint as argparse's."""
    try:
        return parse_guidance_scale(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{error} (e.g. 4.0 or 1.2,8.0)") from None


def require_minimums(args: argparse.Namespace, least: dict[str, int],
                     error: Callable[[str], Exception] | None = None) -> None:
    """Refuse ``--flag`` values below their minimum (None = unset is fine), naming the flag."""
    for name, minimum in least.items():
        value = getattr(args, name)
        if value is not None and value < minimum:
            message = f"--{name.replace('_', '-')} must be at least {minimum}, got {value}"
            raise (error or UserError)(message)
