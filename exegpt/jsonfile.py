"""JSON text and files for the library's data types (Plan, Profile, RunReport), with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ExeGPTError


class JSONFile:
    """Mixin: ``to_json`` / ``from_json`` / ``save`` / ``load`` over a class's ``to_dict`` / ``from_dict``.
    ``_what`` names the kind of file in error messages."""

    __slots__ = ()
    _what = "file"

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str):
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ExeGPTError(f"{cls._what} is not valid JSON: {e.msg} at line {e.lineno}") from None
        return cls.from_dict(d)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        try:
            path.write_text(self.to_json())
        except OSError as e:
            raise ExeGPTError(f"cannot write {self._what} to {str(path)!r}: {e.strerror}") from None
        return path

    @classmethod
    def load(cls, path: str | Path):
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ExeGPTError(f"cannot read {cls._what} {str(path)!r}: {e.strerror}") from None
        return cls.from_json(text)


def known_fields(d, fields, what: str) -> dict:
    """``d`` if it is a JSON object whose keys are all among ``fields``; else one line naming the unknown keys,
    so that a misspelt field is refused rather than dropped."""
    if not isinstance(d, dict):
        raise ExeGPTError(f"{what} must be a JSON object, got {type(d).__name__}")
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ExeGPTError(f"{what} has unknown field{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(map(repr, unknown))}; expected some of {', '.join(sorted(fields))}")
    return d
