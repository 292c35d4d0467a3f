"""LatencyBound: the paper's latency bound on generating one sequence of a given length quantile."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ExeGPTError
from .jsonfile import known_fields


@dataclass(frozen=True, slots=True)
class LatencyBound:
    """Generating an output of the ``length_quantile`` length (p99 by default) must take at most
    ``bound_s`` seconds, from the start of its encoding to its last token. This bounds one sequence
    length, not a percentile of measured request latencies (paper §7.1)."""

    bound_s: float
    length_quantile: float = 0.99

    def __post_init__(self):
        if not isinstance(self.bound_s, (int, float)) or math.isnan(self.bound_s) or self.bound_s <= 0:
            raise ExeGPTError(f"latency bound {self.bound_s!r} s must be a number > 0 (inf for none)")
        if not (0 < self.length_quantile <= 1):
            raise ExeGPTError(f"length quantile {self.length_quantile!r} must be in (0, 1]")

    def to_dict(self) -> dict:
        return {"bound_s": None if math.isinf(self.bound_s) else self.bound_s,
                "length_quantile": self.length_quantile}

    @classmethod
    def from_dict(cls, d: dict) -> LatencyBound:
        known_fields(d, ("form", "bound_s", "length_quantile"), "a latency bound")
        b = d.get("bound_s")
        return cls(math.inf if b is None else float(b), float(d.get("length_quantile", 0.99)))


def as_bound(slo) -> LatencyBound:
    """A LatencyBound from a bound or a number of seconds."""
    if isinstance(slo, LatencyBound):
        return slo
    if isinstance(slo, bool) or not isinstance(slo, (int, float)):
        raise ExeGPTError(f"latency bound {slo!r} must be seconds (a number > 0) or a LatencyBound")
    return LatencyBound(float(slo))
