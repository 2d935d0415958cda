"""argparse value types shared by the command modules: a bad value is a one-line usage error
(exit code 2) naming what was expected, never a traceback."""

from __future__ import annotations

import argparse
from collections.abc import Callable

__all__ = ["names", "int_list", "positive_int", "positive_float"]


def names(allowed: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    """A parser of comma-separated names from ``allowed`` (de-duplicated, order kept)."""

    def parse(text: str) -> tuple[str, ...]:
        items = tuple(s.strip() for s in text.split(",") if s.strip())
        bad = [s for s in items if s not in allowed]
        if not items or bad:
            raise argparse.ArgumentTypeError(
                f"invalid value {text!r}; a comma-separated list from: {', '.join(allowed)}"
            )
        return tuple(dict.fromkeys(items))

    return parse


def int_list(minimum: int, what: str, example: str) -> Callable[[str], tuple[int, ...]]:
    """A parser of comma-separated integers >= ``minimum`` (de-duplicated, order kept); the
    error names them as ``what``, e.g. ``example``."""

    def parse(text: str) -> tuple[int, ...]:
        try:
            items = tuple(int(s) for s in text.split(",") if s.strip())
        except ValueError:
            items = ()
        if not items or any(v < minimum for v in items):
            raise argparse.ArgumentTypeError(
                f"invalid value {text!r}; a comma-separated list of {what}, e.g. {example}")
        return tuple(dict.fromkeys(items))

    return parse


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}; a positive integer")
    return v


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not v > 0:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}; a positive number")
    return v
