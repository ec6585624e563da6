"""resic_tf.validation: exact messages and error classes of the argument checks."""
from __future__ import annotations

import math

import numpy as np
import pytest

from resic_tf.validation import (InvalidTypeError, InvalidValueError, UserError, check_choice,
                                 check_int_sequence, check_scalar)


def raised(fn, *args, **kwargs) -> Exception:
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    return info.value


# ---------------------------------------------------------------------------------------------
# Error classes
# ---------------------------------------------------------------------------------------------

def test_error_classes_are_user_errors_and_builtin_errors():
    assert issubclass(InvalidValueError, UserError) and issubclass(InvalidValueError, ValueError)
    assert issubclass(InvalidTypeError, UserError) and issubclass(InvalidTypeError, TypeError)
    assert not issubclass(InvalidValueError, TypeError)
    assert not issubclass(InvalidTypeError, ValueError)
    # callers that catch the built-in errors keep working
    with pytest.raises(ValueError):
        check_scalar(0, "epochs", int, min_val=1)
    with pytest.raises(TypeError):
        check_scalar("3", "epochs", int, min_val=1)


# ---------------------------------------------------------------------------------------------
# check_scalar: types
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, target, message", [
    (2.5, int, "`x` must be an integer. Received: x=2.5"),
    (3.0, int, "`x` must be an integer. Received: x=3.0"),  # integral float: still not an int
    ("3", int, "`x` must be an integer. Received: x='3'"),
    (None, int, "`x` must be an integer. Received: x=None"),
    (True, int, "`x` must be an integer. Received: x=True"),  # bool is not a number here
    (np.bool_(False), int, f"`x` must be an integer. Received: x={np.bool_(False)!r}"),
    ("0.2", float, "`x` must be a number. Received: x='0.2'"),
    (None, float, "`x` must be a number. Received: x=None"),
    (False, float, "`x` must be a number. Received: x=False"),
    (1 + 2j, float, "`x` must be a number. Received: x=(1+2j)"),
    (1, str, "`x` must be a str. Received: x=1"),
])
def test_wrong_types(value, target, message):
    error = raised(check_scalar, value, "x", target)
    assert type(error) is InvalidTypeError
    assert str(error) == message


def test_accepted_types_are_normalised():
    value = check_scalar(np.int64(7), "n", int)
    assert value == 7 and type(value) is int
    assert type(check_scalar(3, "rate", float)) is float and check_scalar(3, "rate", float) == 3.0
    value = check_scalar(np.float32(0.25), "rate", float)
    assert type(value) is float and value == 0.25
    assert check_scalar("abc", "name", str) == "abc"
    # a tuple of types is checked with isinstance and the value returned as given
    assert check_scalar("a", "x", (int, str)) == "a" and check_scalar(4, "x", (int, str)) == 4
    error = raised(check_scalar, 1.5, "x", (int, str))
    assert type(error) is InvalidTypeError and str(error).endswith("Received: x=1.5")


def test_nan_is_refused_for_floats():
    error = raised(check_scalar, float("nan"), "dropout", float, min_val=0.0, max_val=1.0)
    assert type(error) is InvalidValueError
    assert str(error) == "`dropout` must be a number, not NaN. Received: dropout=nan"
    # even with no bounds at all (NaN would pass every comparison)
    assert str(raised(check_scalar, np.float64("nan"), "lr", float)) == \
        "`lr` must be a number, not NaN. Received: lr=nan"
    assert math.isinf(check_scalar(float("inf"), "lr", float))  # no bound: inf is a number


# ---------------------------------------------------------------------------------------------
# check_scalar: bounds and inclusiveness
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, value, message", [
    ({"min_val": 1}, 0, "`epochs` must be >= 1. Received: epochs=0"),
    ({"min_val": 1}, -3, "`epochs` must be >= 1. Received: epochs=-3"),
    ({"min_val": 1, "include_boundaries": "neither"}, 1,
     "`epochs` must be > 1. Received: epochs=1"),
    ({"min_val": 1, "include_boundaries": "right"}, 1, "`epochs` must be > 1. Received: epochs=1"),
    ({"max_val": 5}, 6, "`epochs` must be <= 5. Received: epochs=6"),
    ({"max_val": 5, "include_boundaries": "left"}, 5, "`epochs` must be < 5. Received: epochs=5"),
    ({"max_val": 5, "include_boundaries": "neither"}, 5,
     "`epochs` must be < 5. Received: epochs=5"),
    ({"min_val": 1, "max_val": 5}, 9, "`epochs` must be in [1, 5]. Received: epochs=9"),
    ({"min_val": 1, "max_val": 5, "include_boundaries": "left"}, 5,
     "`epochs` must be in [1, 5). Received: epochs=5"),
    ({"min_val": 1, "max_val": 5, "include_boundaries": "right"}, 1,
     "`epochs` must be in (1, 5]. Received: epochs=1"),
    ({"min_val": 1, "max_val": 5, "include_boundaries": "neither"}, 5,
     "`epochs` must be in (1, 5). Received: epochs=5"),
])
def test_integer_bounds(kwargs, value, message):
    error = raised(check_scalar, value, "epochs", int, **kwargs)
    assert type(error) is InvalidValueError
    assert str(error) == message


@pytest.mark.parametrize("kwargs, value, message", [
    # float bounds print with %g: 0.0 -> "0", 1.0 -> "1", 1e-3 -> "0.001"
    ({"min_val": 0.0, "max_val": 1.0, "include_boundaries": "left"}, 1.0,
     "`dropout` must be in [0, 1). Received: dropout=1.0"),
    ({"min_val": 0.0, "max_val": 1.0, "include_boundaries": "left"}, -0.1,
     "`dropout` must be in [0, 1). Received: dropout=-0.1"),
    ({"min_val": 0.0, "include_boundaries": "neither"}, 0.0,
     "`dropout` must be > 0. Received: dropout=0.0"),
    ({"min_val": 1e-3}, 0.0005, "`dropout` must be >= 0.001. Received: dropout=0.0005"),
    ({"min_val": 0, "max_val": 1, "include_boundaries": "neither"}, 1,
     "`dropout` must be in (0, 1). Received: dropout=1.0"),  # an int is returned as float
])
def test_float_bounds(kwargs, value, message):
    assert str(raised(check_scalar, value, "dropout", float, **kwargs)) == message


@pytest.mark.parametrize("include, ok, bad", [
    ("both", [0.0, 0.5, 1.0], [-0.01, 1.01]),
    ("left", [0.0, 0.5], [1.0]),
    ("right", [0.5, 1.0], [0.0]),
    ("neither", [0.5], [0.0, 1.0]),
])
def test_inclusiveness_at_the_boundaries(include, ok, bad):
    for v in ok:
        assert check_scalar(v, "p", float, min_val=0.0, max_val=1.0,
                            include_boundaries=include) == v
    for v in bad:
        with pytest.raises(InvalidValueError):
            check_scalar(v, "p", float, min_val=0.0, max_val=1.0, include_boundaries=include)


def test_unknown_include_boundaries_is_a_programming_error():
    with pytest.raises(ValueError) as info:
        check_scalar(1, "x", int, include_boundaries="open")
    assert not isinstance(info.value, UserError)  # the caller's bug, not the user's
    assert str(info.value) == ("`include_boundaries` must be one of ['both', 'left', 'right', "
                               "'neither']. Received: include_boundaries='open'")


# ---------------------------------------------------------------------------------------------
# check_choice and check_int_sequence
# ---------------------------------------------------------------------------------------------

def test_check_choice():
    assert check_choice("best", "select", ("best", "last")) == "best"
    error = raised(check_choice, "worst", "select", ("best", "last"))
    assert type(error) is InvalidValueError
    assert str(error) == "`select` must be one of ['best', 'last']. Received: select='worst'"
    # choices keep the caller's order; a generator is fine
    assert str(raised(check_choice, 3, "k", (x for x in (2, 1)))) == \
        "`k` must be one of [2, 1]. Received: k=3"


@pytest.mark.parametrize("values, error, message", [
    ([8, 0, 8, 8], InvalidValueError, "`filters` must hold integers >= 1. Received: "
                                      "filters=[8, 0, 8, 8]"),
    ((8, -3), InvalidValueError, "`filters` must hold integers >= 1. Received: filters=[8, -3]"),
    ([8, 2.5], InvalidTypeError, "`filters` must hold integers. Received: filters=[8, 2.5]"),
    ([8, True], InvalidTypeError, "`filters` must hold integers. Received: filters=[8, True]"),
    ([8, "64"], InvalidTypeError, "`filters` must hold integers. Received: filters=[8, '64']"),
    ([8, None], InvalidTypeError, "`filters` must hold integers. Received: filters=[8, None]"),
    ([], InvalidValueError, "`filters` must not be empty. Received: filters=()"),
    ("8,8", InvalidTypeError, "`filters` must be a sequence of integers. Received: filters='8,8'"),
    (8, InvalidTypeError, "`filters` must be a sequence of integers. Received: filters=8"),
])
def test_check_int_sequence_errors(values, error, message):
    e = raised(check_int_sequence, values, "filters")
    assert type(e) is error
    assert str(e) == message


def test_check_int_sequence_returns_a_tuple_of_ints():
    out = check_int_sequence([np.int32(4), 8], "filters")
    assert out == (4, 8) and all(type(v) is int for v in out)
    assert check_int_sequence(iter([0, 2]), "blocks", min_val=0) == (0, 2)
    assert str(raised(check_int_sequence, [1, 2], "blocks", min_val=2)) == \
        "`blocks` must hold integers >= 2. Received: blocks=[1, 2]"
