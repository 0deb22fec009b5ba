"""Typed values from any caller: numpy and torch scalars read as the Python numbers they hold, and a bool is
never taken for a number (nor a number for a bool), so `layer=True` or `fuse="maybe"` is an error, not a setting.
"""
from __future__ import annotations

import math
import numbers
import os
import typing
from typing import Any, Union

from .errors import ClipPruneError

_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def plain(value: Any) -> Any:
    """np.float32(0.6) -> 0.6, torch.tensor(3) -> 3: a 0-d numpy/torch value as its Python scalar; else unchanged."""
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)):
        return value.item()
    return value


def coerce(value: Any, tp: Any, what: str) -> Any:
    """`value` as type `tp` (int, float, bool, str, Optional[...]), or a ClipPruneError naming `what`."""
    if typing.get_origin(tp) is Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (tp,) = [a for a in args if a is not type(None)]
    v = plain(value)
    if tp is bool and isinstance(v, bool):
        return v
    if tp is int and isinstance(v, numbers.Integral) and not isinstance(v, bool):
        return int(v)
    if tp is float and isinstance(v, numbers.Real) and not isinstance(v, bool):
        if math.isfinite(v):
            return float(v)
        raise ClipPruneError(f"{what} must be a finite number, got {value!r}")
    if tp is str and isinstance(v, (str, os.PathLike)):
        return os.fspath(v)
    if tp not in _NAMES:  # a type this module does not read (a tensor, a module): the caller's to check
        return value
    raise ClipPruneError(f"{what} must be {_NAMES[tp]}, got {value!r}")
