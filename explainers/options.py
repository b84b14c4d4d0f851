"""Validation of explainer options: clear errors at construction, never asserts."""

from __future__ import annotations

import math

from .errors import InvalidOptionError


def positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidOptionError(f"{name} must be a positive integer, got {value!r}")
    return value


def optional_positive_int(name: str, value: object) -> int | None:
    return None if value is None else positive_int(name, value)


def fraction(name: str, value: object, *, allow_zero: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidOptionError(f"{name} must be a number, got {value!r}")
    low_ok = value >= 0 if allow_zero else value > 0
    if not (low_ok and value <= 1):
        raise InvalidOptionError(f"{name} must be in {'[0' if allow_zero else '(0'}, 1], got {value!r}")
    return float(value)


def number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidOptionError(f"{name} must be a finite number, got {value!r}")
    return float(value)
