"""Checks at the door: a public entry's arguments are tested for type, range and size before anything is
computed or allocated, each failure one ``ExeGPTError`` line naming the value and what was expected."""

from __future__ import annotations

import math
import numbers

from .errors import ExeGPTError

MAX_TOKENS = 10_000_000
"""The longest sequence a length distribution, trace or model may name (tokens): above any model's context, small
enough that a length table of it fits in memory."""
MAX_DEVICES = 4096
"""The most devices one cluster may have."""
MAX_REQUESTS = 1_000_000
"""The most requests one run (simulated or executed) may be asked to serve."""


def number(value, what: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
           finite: bool = True) -> float:
    """``value`` as a float, if it is a real number (not a bool or a string) within ``[lo, hi]`` (``(lo, hi]``
    with ``lo_open``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value) or (
            finite and math.isinf(value)) or (lo is not None and (value <= lo if lo_open else value < lo)) or (
            hi is not None and value > hi):
        raise ExeGPTError(f"{what} {value!r} must be {_range('a number', lo, hi, lo_open, finite)}")
    return float(value)


def whole(value, what: str, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an int, if it is a whole number (an int, or an integral float; not a bool or a string) within
    ``[lo, hi]``."""
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value) and \
        value == int(value)
    if not ok or (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ExeGPTError(f"{what} {value!r} must be {_range('a whole number', lo, hi, False, True)}")
    return int(value)


def instance(value, types, what: str, expected: str):
    """``value`` if it is an instance of ``types`` (a type, tuple or union); else one line naming what it is and
    ``expected`` (e.g. "a Plan (find_schedule's result, or Plan.load(path))")."""
    if not isinstance(value, types):
        raise ExeGPTError(f"{what} must be {expected}, got {type(value).__name__} {_short(value)}")
    return value


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _range(kind: str, lo, hi, lo_open: bool, finite: bool) -> str:
    if lo is not None and hi is not None:
        return f"{kind} in {'(' if lo_open else '['}{lo:,}, {hi:,}]"
    if lo is not None:
        return f"{kind} {'>' if lo_open else '>='} {lo:,}"
    if hi is not None:
        return f"{kind} <= {hi:,}"
    return f"{'a finite' if finite else 'a'} {kind.removeprefix('a ')}"
