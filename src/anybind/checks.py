"""Small checks every part uses: did-you-mean, numbers, slugs (one copy of each)."""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Iterable
from typing import Any

from .errors import AnybindError


class ValueCheckError(AnybindError, ValueError):
    """A setting with a value of the wrong kind or out of range."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def slug(text: str) -> str:
    """A file-name-safe form of `text`: letters, digits, '-', '_' and '.' kept, the rest '_'."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text)) or "_"


def number(what: str, value: Any, *, minimum: float | None = None, maximum: float | None = None,
           strict: bool = False, error: type[Exception] = ValueCheckError) -> float:
    """A finite real number (bools, NaN and infinities refused), optionally bounded; `strict`
    makes the minimum exclusive."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise error(f"{what} must be a finite number, not {value!r}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise error(f"{what} must be {'above' if strict else 'at least'} {minimum}, not {value!r}")
    if maximum is not None and value > maximum:
        raise error(f"{what} must be at most {maximum}, not {value!r}")
    return float(value)


def positive(what: str, value: Any, error: type[Exception] = ValueCheckError) -> float:
    return number(what, value, minimum=0, strict=True, error=error)


def integer(what: str, value: Any, *, minimum: int | None = None,
            error: type[Exception] = ValueCheckError) -> int:
    """An integer, Python's or numpy's (bools refused), optionally at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise error(f"{what} must be an integer, not {value!r}")
    if minimum is not None and value < minimum:
        raise error(f"{what} must be at least {minimum}, not {value!r}")
    return int(value)


def flag(what: str, value: Any, error: type[Exception] = ValueCheckError) -> bool:
    if not isinstance(value, bool):
        raise error(f"{what} must be true or false, not {value!r}")
    return value


def choice(what: str, value: Any, choices: Iterable[Any], error: type[Exception] = ValueCheckError) -> Any:
    choices = list(choices)
    if value not in choices:
        raise error(f"{what} must be one of {', '.join(map(str, choices))}, not {value!r}"
                    f"{did_you_mean(str(value), map(str, choices))}")
    return value
