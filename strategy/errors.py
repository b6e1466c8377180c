"""Validation errors that name the exact place of a bad input.

Every validator in Stratarank collects *all* problems of an input before raising, so a
product team fixes a YAML file in one pass and a client sees every bad field of a body.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass


@dataclass(frozen=True)
class FieldError:
    """One problem: ``path`` is a key path such as ``candidates[3].item_id``."""

    path: str
    message: str
    code: str = "invalid"
    file: str | None = None
    line: int | None = None

    def __str__(self) -> str:
        where = ""
        if self.file:
            where = f"{self.file}:{self.line}: " if self.line else f"{self.file}: "
        return f"{where}{self.path or '<root>'}: {self.message}"

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "path": self.path}


class ValidationError(ValueError):
    """Raised with every :class:`FieldError` found in one input."""

    def __init__(self, errors: list[FieldError]):
        self.errors = list(errors)
        super().__init__("\n".join(str(e) for e in self.errors))


def join_path(path: str, key) -> str:
    """``join_path('a', 'b') == 'a.b'``; integer keys become ``a[3]``."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def did_you_mean(word: str, choices) -> str:
    """`` did you mean 'weight'?`` for a near miss, else an empty string."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


class Errors:
    """Collects :class:`FieldError` values; ``raise_if_any`` raises them together."""

    def __init__(self, limit: int = 200):
        self.items: list[FieldError] = []
        self.limit = limit

    def add(self, path: str, message: str, code: str = "invalid") -> None:
        if len(self.items) < self.limit:
            self.items.append(FieldError(path, message, code))

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_if_any(self, file: str | None = None, lines: dict[str, int] | None = None) -> None:
        if not self.items:
            return
        if file is not None or lines:
            self.items = [
                FieldError(e.path, e.message, e.code, file, _line_for(e.path, lines or {}))
                for e in self.items
            ]
        raise ValidationError(self.items)


def _line_for(path: str, lines: dict[str, int]) -> int | None:
    """The line of ``path`` or of its nearest ancestor that the file contains."""
    while path:
        if path in lines:
            return lines[path]
        cut = max(path.rfind("."), path.rfind("["))
        path = path[:cut] if cut > 0 else ""
    return lines.get("", None)
