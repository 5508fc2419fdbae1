"""The numeric checks every setting shares. Booleans are refused: ``True`` is an ``int`` to Python,
but never a number of seconds or of attempts to a user."""

from __future__ import annotations

from typing import Any

from .errors import ConfigurationError


def seconds(name: str, value: Any, *, positive: bool = False, or_none: str = "", param: str | None = None) -> float:
    """``value`` as a float number of seconds, ``>= 0`` (``> 0`` when ``positive``); NaN refused.
    ``param`` is the argument the error names (default: ``name``)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not (value > 0 or (value == 0 and not positive)):  # "not >": NaN fails too
        bound = "> 0" if positive else ">= 0"
        raise ConfigurationError(f"{name} must be a number of seconds {bound}{or_none}, got {value!r}",
                                 param=param or name)
    return float(value)


def optional_seconds(name: str, value: Any, *, positive: bool = False, param: str | None = None) -> float | None:
    return None if value is None else seconds(name, value, positive=positive, or_none=" or None", param=param)


def whole(name: str, value: Any, *, minimum: int = 1, unit: str = "", or_none: str = "") -> int:
    """``value`` as an int ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = f" of {unit}" if unit else ""
        message = f"{name} must be a whole number{what} >= {minimum}{or_none}, got {value!r}"
        raise ConfigurationError(message, param=name)
    return value


def optional_whole(name: str, value: Any, *, minimum: int = 1, unit: str = "") -> int | None:
    return None if value is None else whole(name, value, minimum=minimum, unit=unit, or_none=" or None")
