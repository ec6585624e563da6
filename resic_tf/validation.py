"""Argument checks at the boundary, in scikit-learn's `check_scalar` style.

Every public entry point (configs, layers, gate, training) validates its arguments here, so a
mistake fails at once with the argument's name and `Received: name=value`. The errors are
`UserError`s: the CLI prints them as one line (exit 2) while internal bugs keep their traceback.
"""
from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Any

import numpy as np


class UserError(Exception):
    """Marker of a mistake in what the user gave (arguments, data, files): reported in one line."""


class InvalidValueError(UserError, ValueError):
    """An argument has the right type but a value outside what is allowed."""


class InvalidTypeError(UserError, TypeError):
    """An argument has the wrong type."""


_BOUNDS = {"both": ("[", "]"), "left": ("[", ")"), "right": ("(", "]"), "neither": ("(", ")")}


def check_scalar(x: Any, name: str, target_type: type | tuple[type, ...], *,
                 min_val: float | None = None, max_val: float | None = None,
                 include_boundaries: str = "both") -> Any:
    """Check that `x` is a scalar of `target_type` within `[min_val, max_val]`; return it.

    `target_type` is `int` (any integral number, not bool; returned as int), `float` (any real
    number, not bool; returned as float), `bool` (True/False only, not 0/1), or a tuple of types
    checked with `isinstance`.
    `include_boundaries` is "both", "left", "right" or "neither".

    Example:
        >>> check_scalar(0.2, "dropout", float, min_val=0, max_val=1, include_boundaries="left")
        0.2
    """
    if include_boundaries not in _BOUNDS:
        raise ValueError(f"`include_boundaries` must be one of {list(_BOUNDS)}. "
                         f"Received: include_boundaries={include_boundaries!r}")
    if target_type is bool:
        if not isinstance(x, (bool, np.bool_)):
            raise InvalidTypeError(f"`{name}` must be True or False. Received: {name}={x!r}")
        return bool(x)
    if target_type is int:
        ok, kind = isinstance(x, numbers.Integral), "an integer"
    elif target_type is float:
        ok, kind = isinstance(x, numbers.Real), "a number"
    else:
        ok = isinstance(x, target_type)
        types_ = target_type if isinstance(target_type, tuple) else (target_type,)
        kind = " or ".join(("an " if t.__name__[0] in "aeiou" else "a ") + t.__name__
                           for t in types_)
    if isinstance(x, (bool, np.bool_)) or not ok:
        raise InvalidTypeError(f"`{name}` must be {kind}. Received: {name}={x!r}")
    if target_type is int:
        x = int(x)
    elif target_type is float:
        x = float(x)
        if x != x:  # NaN passes every comparison below
            raise InvalidValueError(f"`{name}` must be a number, not NaN. Received: {name}={x!r}")
    left, right = _BOUNDS[include_boundaries]
    low_ok = min_val is None or (x >= min_val if left == "[" else x > min_val)
    high_ok = max_val is None or (x <= max_val if right == "]" else x < max_val)
    if not (low_ok and high_ok):
        lo, hi = (f"{v:g}" if isinstance(v, float) else str(v) for v in (min_val, max_val))
        if max_val is None:
            rule = f"{'>=' if left == '[' else '>'} {lo}"
        elif min_val is None:
            rule = f"{'<=' if right == ']' else '<'} {hi}"
        else:
            rule = f"in {left}{lo}, {hi}{right}"
        raise InvalidValueError(f"`{name}` must be {rule}. Received: {name}={x!r}")
    return x


def check_choice(x: Any, name: str, choices: Iterable[Any]) -> Any:
    """Check that `x` is one of `choices`; return it."""
    choices = list(choices)
    if x not in choices:
        raise InvalidValueError(f"`{name}` must be one of {choices}. Received: {name}={x!r}")
    return x


def check_int_sequence(values: Any, name: str, min_val: int = 1) -> tuple[int, ...]:
    """A non-empty sequence of integers >= `min_val`, as a tuple."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise InvalidTypeError(f"`{name}` must be a sequence of integers. Received: {name}={values!r}")
    values = tuple(values)
    if not values:
        raise InvalidValueError(f"`{name}` must not be empty. Received: {name}={values!r}")
    for v in values:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
            raise InvalidTypeError(f"`{name}` must hold integers. Received: {name}={list(values)!r}")
        if v < min_val:
            raise InvalidValueError(f"`{name}` must hold integers >= {min_val}. "
                                    f"Received: {name}={list(values)!r}")
    return tuple(int(v) for v in values)
