"""numpy / jax values as plain JSON, and strict JSON files.

One rule for every JSON the project writes (checkpoint extras, metrics lines, evaluation
reports, benchmark results): ``None``, ``bool`` and ``str`` stay; Python, numpy and jax
integers and booleans become ``int`` / ``bool``; floats become ``float``; arrays become
(nested) lists; tuples become lists; mapping keys must be strings (integer keys are
written as strings, as :func:`json.dump` would).  Anything else is a ``TypeError`` that
names where in the value it sits.  JSON has no NaN or infinity: a non-finite float is a
``ValueError`` (``nonfinite="error"``) or ``null`` with a one-time ``RuntimeWarning``
(``nonfinite="null"``, for logs that must not stop a run).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

__all__ = ["to_jsonable", "write_json"]

_WARNED: set[str] = set()


def _nonfinite(x: float, where: str, nonfinite: str) -> None:
    if nonfinite == "error":
        raise ValueError(f"{where}: non-finite float {x!r} is not JSON-able (JSON has no NaN / infinity)")
    if where not in _WARNED:
        _WARNED.add(where)
        warnings.warn(f"{where} is {x}; written as null in JSON", RuntimeWarning, stacklevel=4)


def to_jsonable(value: Any, *, where: str = "value", nonfinite: Literal["error", "null"] = "error") -> Any:
    """``value`` as plain JSON types (see the module docstring for the rule).

    Args:
      value: nested mappings / lists / tuples of scalars and numpy or jax arrays.
      where: the name of ``value`` in error messages (nested fields are named
        ``where.key`` and ``where[i]``).
      nonfinite: ``"error"`` raises on NaN / infinity; ``"null"`` writes ``None`` and warns
        once per field.
    """
    if nonfinite not in ("error", "null"):
        raise ValueError(f"to_jsonable: nonfinite must be 'error' or 'null', got {nonfinite!r}")
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (np.ndarray, np.generic)) or hasattr(value, "__array__"):  # numpy, jax
        array = np.asarray(value)
        if array.dtype.kind not in "biuf":
            raise TypeError(f"{where}: array of dtype {array.dtype} is not JSON-able (expected bool, int or float)")
        if array.ndim:
            return [to_jsonable(v, where=f"{where}[{i}]", nonfinite=nonfinite) for i, v in enumerate(array)]
        value = array.item()  # a Python bool, int or float
        if isinstance(value, bool):
            return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            _nonfinite(value, where, nonfinite)
            return None
        return float(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if isinstance(k, (int, np.integer)) and not isinstance(k, bool):
                k = str(int(k))
            if not isinstance(k, str):
                raise TypeError(f"{where}: mapping key {k!r} must be a str")
            out[k] = to_jsonable(v, where=f"{where}.{k}", nonfinite=nonfinite)
        return out
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, where=f"{where}[{i}]", nonfinite=nonfinite) for i, v in enumerate(value)]
    raise TypeError(f"{where}: value of type {type(value).__name__} is not JSON-able "
                    "(expected None, bool, int, float, str, list, tuple, mapping or a numpy / jax array)")


def write_json(path: str | os.PathLike, data: Any, *, nonfinite: Literal["error", "null"] = "error",
               sort_keys: bool = False, indent: int | None = 2) -> str:
    """Write ``to_jsonable(data)`` as strict JSON (a final newline; parent folders made); returns the path."""
    path = os.fspath(path)
    text = json.dumps(to_jsonable(data, where=path, nonfinite=nonfinite), indent=indent, sort_keys=sort_keys,
                      allow_nan=False)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    return path
