"""When requests arrive, and the request stream both engines serve.

Three arrival processes:
  * ``Arrivals.all_at_once()``: every request is waiting at time zero, the saturated queue of the paper's
    evaluation (the default);
  * ``Arrivals.poisson(rate_per_s)``: exponential gaps at a mean rate (seeded);
  * ``Arrivals.trace(speedup)``: a trace's own timestamps, its requests in trace order, the gaps divided by
    ``speedup``.

``request_stream(workload, n, seed, arrivals)`` draws the (input, output) lengths and the arrival times of ``n``
requests. The simulated engine (``exegpt.sim``) and the runner (``runner.requests.make_requests``) both call it, so
a seed gives the same requests to both. The lengths of the first two processes are the ones drawn before arrivals
existed (``sample_lengths``); the arrival times come from a generator of their own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .checks import MAX_REQUESTS
from .errors import ExeGPTError
from .workload import Workload

KINDS = ("all", "poisson", "trace")


@dataclass(frozen=True, slots=True)
class Arrivals:
    """An arrival process; build it with ``all_at_once``, ``poisson`` or ``trace``, or ``parse`` a CLI text."""

    kind: str = "all"
    """'all' (every request at time zero), 'poisson' or 'trace'."""
    rate_per_s: float = 0.0
    """Poisson: mean requests per second."""
    speedup: float = 1.0
    """Trace: the trace's gaps are divided by this (2: twice as fast)."""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ExeGPTError(f"arrival process {self.kind!r} is unknown; expected one of {', '.join(KINDS)}")
        if self.kind == "poisson" and not (isinstance(self.rate_per_s, (int, float)) and self.rate_per_s > 0
                                           and math.isfinite(self.rate_per_s)):
            raise ExeGPTError(f"arrival rate {self.rate_per_s!r} requests/s must be a finite number > 0")
        if not (isinstance(self.speedup, (int, float)) and self.speedup > 0 and math.isfinite(self.speedup)):
            raise ExeGPTError(f"trace speed-up {self.speedup!r} must be a finite number > 0")

    @classmethod
    def all_at_once(cls) -> Arrivals:
        return cls("all")

    @classmethod
    def poisson(cls, rate_per_s: float) -> Arrivals:
        return cls("poisson", rate_per_s=rate_per_s)

    @classmethod
    def trace(cls, speedup: float = 1.0) -> Arrivals:
        return cls("trace", speedup=speedup)

    @classmethod
    def parse(cls, text: str) -> Arrivals:
        """``all``, ``poisson:RATE`` (requests/s) or ``trace[:SPEEDUP]``."""
        kind, _, arg = str(text).partition(":")
        if kind in ("poisson", "trace") and (arg or kind == "poisson"):
            try:
                value = float(arg)
            except ValueError:
                raise ExeGPTError(f"arrivals {text!r}: {arg!r} is not a number") from None
            return cls.poisson(value) if kind == "poisson" else cls.trace(value)
        if kind == "trace":
            return cls.trace()
        if kind == "all" and not arg:
            return cls.all_at_once()
        raise ExeGPTError(f"arrivals {text!r} not understood; expected all, poisson:RATE or trace[:SPEEDUP]")

    @property
    def saturated(self) -> bool:
        """Every request waiting from the start (the paper's setting)."""
        return self.kind == "all"

    def describe(self) -> str:
        if self.kind == "poisson":
            return f"poisson {self.rate_per_s:g}/s"
        if self.kind == "trace":
            return f"trace timestamps x{self.speedup:g}"
        return "all at once"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "rate_per_s": self.rate_per_s, "speedup": self.speedup}

    @classmethod
    def from_dict(cls, d: dict) -> Arrivals:
        return cls(d.get("kind", "all"), float(d.get("rate_per_s", 0.0)), float(d.get("speedup", 1.0)))


@dataclass(frozen=True, eq=False)
class RequestStream:
    """The lengths and arrival times of a run's requests, in id order (ids 0, 1, ...)."""

    lengths: np.ndarray
    """``[n, 2]`` int64: (input, output) tokens; the output counts the prefill's token."""
    arrival_s: np.ndarray
    """``[n]`` float: seconds from the run's start, non-decreasing."""
    rng: np.random.Generator
    """The generator after the length draws (the runner draws prompt ids from it)."""

    def __len__(self) -> int:
        return len(self.lengths)


def sample_lengths(workload: Workload, n: int, seed: int = 0, joint: bool = True
                   ) -> tuple[np.random.Generator, np.ndarray]:
    """The (input, output) lengths of ``n`` requests drawn from ``workload`` with ``seed`` (``[n, 2]``), and the
    generator after those draws."""
    rng = np.random.default_rng(seed)
    return rng, workload.sample(n, rng, joint=joint)


def request_stream(workload: Workload, n: int, seed: int = 0, arrivals: Arrivals | None = None,
                   joint: bool = True) -> RequestStream:
    """``n`` requests of ``workload`` arriving by ``arrivals`` (default: all at once), deterministic in ``seed``."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= MAX_REQUESTS:
        raise ExeGPTError(f"number of requests {n!r} must be a whole number in [1, {MAX_REQUESTS:,}]")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ExeGPTError(f"seed {seed!r} must be a whole number >= 0")
    arrivals = arrivals or Arrivals.all_at_once()
    if arrivals.kind == "trace":
        if workload.arrivals_s is None:
            raise ExeGPTError(f"workload {workload.name!r} has no timestamps to replay; use a trace with an "
                              f"arrival column (arrived_at or TIMESTAMP), or poisson:RATE arrivals")
        if n > len(workload.pairs):
            raise ExeGPTError(f"the trace {workload.name!r} has {len(workload.pairs)} requests; {n} were asked "
                              f"to replay its timestamps")
        order = np.argsort(np.asarray(workload.arrivals_s[:n]), kind="stable")
        lengths = np.asarray(workload.pairs[:n], dtype=np.int64)[order]
        t = np.asarray(workload.arrivals_s[:n], dtype=float)[order]
        return RequestStream(lengths, (t - t[0]) / arrivals.speedup, np.random.default_rng(seed))
    rng, lengths = sample_lengths(workload, n, seed, joint)
    if arrivals.kind == "poisson":
        gaps = np.random.default_rng([seed, 1]).exponential(1.0 / arrivals.rate_per_s, size=n)
        t = np.concatenate([[0.0], np.cumsum(gaps[1:])])  # the first request opens the run
    else:
        t = np.zeros(n)
    return RequestStream(np.asarray(lengths, dtype=np.int64), t, rng)
