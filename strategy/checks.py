"""Small typed checks shared by the request schema and the YAML loaders.

Each check records a :class:`~strategy.errors.FieldError` on failure and returns ``None``,
so a caller keeps going and reports every problem of an input at once.
"""
from __future__ import annotations

import math
import re

from .errors import Errors, did_you_mean, join_path

NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
MAX_ID_LEN = 256


def type_name(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def nodes(value, path: str = ""):
    """Every value inside ``value``, itself included, as ``(path, value, level)`` (``value`` is
    level 1), depth first without recursion: a JSON body may nest a thousand levels."""
    stack = [(path, value, 1)]
    while stack:
        where, node, level = stack.pop()
        yield where, node, level
        if type(node) is dict:
            stack.extend((join_path(where, key), child, level + 1) for key, child in node.items())
        elif type(node) is list:
            stack.extend((f"{where}[{i}]", child, level + 1) for i, child in enumerate(node))


def check_keys(errs: Errors, obj: dict, path: str, allowed, required=()) -> None:
    """Unknown keys (with a suggestion) and missing required keys."""
    for key in obj:
        if key not in allowed:
            errs.add(
                join_path(path, key),
                f"unknown key '{key}'{did_you_mean(key, allowed)} (allowed: {', '.join(sorted(allowed))})",
                "unknown_key",
            )
    for key in required:
        if key not in obj:
            errs.add(join_path(path, key), "required", "required")


def as_dict(errs: Errors, value, path: str) -> dict | None:
    if isinstance(value, dict):
        return value
    errs.add(path, f"expected an object, got {type_name(value)}", "type")
    return None


def as_list(errs: Errors, value, path: str, max_len: int | None = None) -> list | None:
    if not isinstance(value, list):
        errs.add(path, f"expected an array, got {type_name(value)}", "type")
        return None
    if max_len is not None and len(value) > max_len:
        errs.add(path, f"at most {max_len} entries allowed, got {len(value)}", "too_many")
        return None
    return value


def as_number(
    errs: Errors,
    value,
    path: str,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
    integer: bool = False,
) -> float | int | None:
    """A finite number (booleans rejected) within ``[lo, hi]`` (open ends optional)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        errs.add(path, f"expected {'an integer' if integer else 'a number'}, got {type_name(value)}", "type")
        return None
    if integer and not (isinstance(value, int) or float(value).is_integer()):
        errs.add(path, f"expected an integer, got {value}", "type")
        return None
    if not _finite(value):
        got = value if isinstance(value, float) else "an integer too large for a double"  # str() of it may fail
        errs.add(path, f"expected a finite number, got {got}", "range")
        return None
    too_low = lo is not None and (value <= lo if lo_open else value < lo)
    too_high = hi is not None and (value >= hi if hi_open else value > hi)
    if too_low or too_high:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        span = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
        errs.add(path, f"{value} is out of range {span}", "range")
        return None
    return int(value) if integer else value


def _finite(value: int | float) -> bool:
    """Whether ``value`` is a finite double (an integer too large for one, say 10**400, is not)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def as_str(
    errs: Errors,
    value,
    path: str,
    choices=None,
    pattern: re.Pattern | None = None,
    max_len: int = 10_000,
) -> str | None:
    if not isinstance(value, str):
        errs.add(path, f"expected a string, got {type_name(value)}", "type")
        return None
    if choices is not None and value not in choices:
        errs.add(
            path,
            f"'{value}' is not allowed{did_you_mean(value, choices)} (allowed: {', '.join(choices)})",
            "choice",
        )
        return None
    if pattern is not None and not pattern.fullmatch(value):   # the whole value: "$" alone lets "name\n" match
        errs.add(path, f"'{value}' must match {pattern.pattern}", "pattern")
        return None
    if len(value) > max_len:
        errs.add(path, f"at most {max_len} characters allowed, got {len(value)}", "too_long")
        return None
    return value


def as_names(errs: Errors, value, path: str, allowed=None, what: str = "name", max_len: int = 100) -> tuple | None:
    """A non-empty list of distinct strings, each one of ``allowed`` when given (an unknown one is an
    error naming ``path[i]`` and the allowed values); None when invalid."""
    names = as_list(errs, value, path, max_len=max_len)
    if names is None:
        return None
    before = len(errs.items)
    if not names:
        errs.add(path, f"at least one {what} is required", "required")
    for i, name in enumerate(names):
        if not isinstance(name, str):
            errs.add(f"{path}[{i}]", f"expected {'an' if what[:1] in 'aeiou' else 'a'} {what}, got {type_name(name)}",
                     "type")
        elif allowed is not None and name not in allowed:
            errs.add(f"{path}[{i}]", f"unknown {what} '{name}'{did_you_mean(name, list(allowed))} "
                     f"(allowed: {', '.join(allowed)})", f"unknown_{what.replace(' ', '_')}")
    if len(set(map(str, names))) != len(names):
        errs.add(path, f"{what}s listed twice", "duplicate")
    return tuple(names) if len(errs.items) == before else None


def as_numbers(errs: Errors, obj: dict, path: str, ranges: dict) -> dict:
    """The numbers of ``obj`` that ``ranges`` names, each checked by :func:`as_number`:
    ``{key: (lo, hi, integer, lo_open)}``; absent or null keys are left out, bad ones reported."""
    out = {}
    for key, (lo, hi, integer, lo_open) in ranges.items():
        if obj.get(key) is not None:
            v = as_number(errs, obj[key], join_path(path, key) if path else key, lo=lo, hi=hi, integer=integer,
                          lo_open=lo_open)
            if v is not None:
                out[key] = v
    return out


def as_bool(errs: Errors, value, path: str) -> bool | None:
    """A YAML boolean; anything else (``"yes"``, 1) is an error naming ``path``."""
    if not isinstance(value, bool):
        errs.add(path, f"expected true or false, got {type_name(value)}", "type")
        return None
    return value


def as_id(errs: Errors, value, path: str) -> str | None:
    """An identifier: a string of 1..``MAX_ID_LEN`` characters. A number is not one (JSON clients
    round integers past 2**53, so a numeric id may not be the one the client meant)."""
    if isinstance(value, str):
        if 0 < len(value) <= MAX_ID_LEN:
            return value
        errs.add(path, f"must be 1..{MAX_ID_LEN} characters", "invalid")
    else:
        errs.add(path, f"expected a string id, got {type_name(value)}", "type")
    return None
