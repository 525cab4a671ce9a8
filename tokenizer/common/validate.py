"""Checks of single settings, before anything is written: the right type, finite, in range, not empty.

Each takes the setting's name as the user writes it (`sampler.top_p`) and raises ConfigError naming the name and
the value. Config dataclasses call them from their `check()` methods."""
from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real
from typing import Any

from tokenizer.common.errors import ConfigError


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def number(value: Any, name: str, *, low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False, integer: bool = False) -> float | int:
    """`value` itself when it is a finite number (an integer if `integer`) within [low, high] (open ends where
    asked); else ConfigError naming `name`."""
    kind = "an integer" if integer else "a finite number"
    if not _is_number(value) or (integer and not isinstance(value, Integral)):
        raise ConfigError(f"{name}={value!r}: expected {kind}, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ConfigError(f"{name}={value}: expected a finite number")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        left = "-inf" if low is None else f"{low:g}"
        right = "inf" if high is None else f"{high:g}"
        interval = f"{'(' if low_open or low is None else '['}{left}, {right}{')' if high_open or high is None else ']'}"
        raise ConfigError(f"{name}={value}: expected {kind} in {interval}")
    return value


def integer(value: Any, name: str, *, low: int | None = None, high: int | None = None) -> int:
    return number(value, name, low=low, high=high, integer=True)


def optional_integer(value: Any, name: str, *, low: int | None = None, high: int | None = None) -> int | None:
    return None if value is None else integer(value, name, low=low, high=high)


def per_group(value: Any, name: str, groups: int | None = None, **bounds) -> list:
    """A number or a non-empty list of numbers (one per group, `groups` of them when given), each checked by
    `number(..., **bounds)`; returns the list of values (a scalar gives one)."""
    if isinstance(value, (str, bytes)) or not (_is_number(value) or isinstance(value, Sequence)):
        raise ConfigError(f"{name}={value!r}: expected a number or a list of numbers (one per group)")
    values = [value] if _is_number(value) else list(value)
    if not values:
        raise ConfigError(f"{name}=[]: expected a number or a non-empty list (one per group)")
    if groups is not None and len(values) not in (1, groups):
        raise ConfigError(f"{name}={values}: expected a number or {groups} values (one per group)")
    for i, v in enumerate(values):
        number(v, name if len(values) == 1 and _is_number(value) else f"{name}[{i}]", **bounds)
    return values


def choice(value: Any, name: str, choices: Sequence) -> Any:
    if value not in choices:
        raise ConfigError(f"{name}={value!r}: expected one of {list(choices)}")
    return value


def non_empty(value: Any, name: str) -> Any:
    """A path or name that must be given: not None and not an empty string."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ConfigError(f"{name} is empty: it must be set")
    return value
