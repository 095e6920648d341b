"""Strict JSON for everything that crosses a process boundary: request bodies, task messages, results.

RFC 8259 JSON and nothing looser. orjson does the work (it already refuses `NaN`, `Infinity`, numbers past a
double's range, lone surrogates and nesting deeper than 1024), with two gaps closed here:

- integers wider than 64 bits: orjson reads them as floats and cannot write them at all, so a text holding a
  run of 20+ digits (or a negative 19-digit one) is read by the standard library after orjson has validated it,
  and a value orjson cannot write is written by the standard library: `2**80` arrives as `2**80`;
- non-finite floats on the way out: orjson writes `NaN` as `null` without a word; here it is an error, so a
  deployment returning `float("nan")` fails loudly instead of answering `null`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

import orjson

OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY  # int keys as JSON does; numpy arrays as lists
MAX_DEPTH = 1024  # orjson's own limit, stated for messages
_WIDE_INT = re.compile(rb"\d{20,}|-\d{19}")  # may not fit 64 bits: 2**64 has 20 digits, -2**63 has 19


class NotJSONError(ValueError):
    """A value that has no JSON form (NaN, an infinity) or a text that is not JSON; the message says where."""


def loads(data: bytes | str) -> Any:
    """Parse strict JSON; raises `NotJSONError` saying what is wrong (and where)."""
    raw = data.encode() if isinstance(data, str) else data
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise NotJSONError(_describe(exc)) from None
    if _WIDE_INT.search(raw) is None:
        return value
    return json.loads(raw)  # already validated above; the standard library keeps wide integers exact


def dumps(value: Any) -> bytes:
    """Encode as JSON; raises `NotJSONError` for NaN or an infinity anywhere in `value` (never writes `null`)."""
    try:
        out = orjson.dumps(value, option=OPTIONS)
    except TypeError as exc:
        if "64-bit" not in str(exc):
            raise
        out = _wide_dumps(value)
    if b"null" in out:  # orjson writes NaN and infinities as null: look only when a null is there at all
        where = find_non_finite(value)
        if where is not None:
            raise NotJSONError(f"{where[1]} at {where[0]} has no JSON form (return a finite number or None)")
    return out


def find_non_finite(value: Any, path: str = "$") -> tuple[str, str] | None:
    """The JSON path and repr of the first NaN or infinity in `value`, or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (path, repr(value))
    if isinstance(value, dict):
        for key, item in value.items():
            found = find_non_finite(item, f"{path}.{key}")
            if found:
                return found
        return None
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = find_non_finite(item, f"{path}[{i}]")
            if found:
                return found
        return None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return find_non_finite({f.name: getattr(value, f.name) for f in dataclasses.fields(value)}, path)
    dtype = getattr(value, "dtype", None)
    if dtype is not None and getattr(dtype, "kind", "") in "fc":  # a numpy array or scalar of floats
        import numpy

        if not bool(numpy.isfinite(value).all()):
            return path, "a non-finite number"
    return None


def _wide_dumps(value: Any) -> bytes:
    def default(obj: Any) -> Any:
        if hasattr(obj, "tolist"):
            return obj.tolist()
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return dataclasses.asdict(obj)
        raise TypeError(f"Type is not JSON serializable: {type(obj).__name__}")

    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False, default=default).encode()
    except ValueError:  # a NaN beside the wide integer
        path, what = find_non_finite(value) or ("$", "a value")
        raise NotJSONError(f"{what} at {path} has no JSON form (return a finite number or None)") from None


def _describe(exc: orjson.JSONDecodeError) -> str:
    text = str(exc)
    if "depth limit" in text:
        return f"JSON nested deeper than {MAX_DEPTH} levels ({text})"
    if "infinity" in text:
        return f"a number beyond the range of a double ({text})"
    if "expected a JSON value" in text:
        return f"{text} (NaN, Infinity and other non-JSON tokens are refused)"
    return text
