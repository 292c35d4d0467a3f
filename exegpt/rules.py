"""The arithmetic of the scheduling rules the policy drivers (``exegpt.policies``) follow: admission, refill, cache
rows and micro-batch splits.

Also how a run's throughput is read off its completion times (its ``SteadyWindow``, else ``steady_rate``), which a
measured run and a simulated one share (``exegpt.report``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .checks import whole


STEADY_LO, STEADY_HI = 0.10, 0.90
"""Without an executor's steady window, throughput is taken between the 10 % and 90 % completion times."""
MIN_STEADY_FINISHES = 20
"""An executor's steady window is used only when at least this many requests finished inside it."""


def split_even(items: list, parts: int) -> list[list]:
    """``items`` in order, cut into at most ``parts`` contiguous chunks whose sizes differ by at most one."""
    parts = max(1, min(parts, len(items)))
    q, r = divmod(len(items), parts)
    out, i = [], 0
    for p in range(parts):
        size = q + (p < r)
        out.append(items[i:i + size])
        i += size
    return [c for c in out if c]


# --- RRA ------------------------------------------------------------------------------------------

def refill_batch(estimate) -> float:
    """The estimate's refill batch (plans of older versions have only the mean decode batch)."""
    return estimate.refill_batch or estimate.decode_batch


def rra_cache_rows(plan) -> int:
    """KV-cache rows of an RRA run: ``ceil(refill_batch) + encode_batch``."""
    return max(1, math.ceil(refill_batch(plan.estimate))) + plan.schedule.encode_batch


def rra_refill_target(plan) -> int:
    """The decode batch RRA refills to at each encode phase: ``round(refill_batch)``, at least 1."""
    return max(1, round(refill_batch(plan.estimate)))


def rra_admit(encode_batch: int, finished: int, alive: int, target: int, rows: int) -> int:
    """Queries an RRA encode phase wants to admit: as many as finished since the last phase (the paper's refill),
    at least ``encode_batch`` (while the batch ramps up), never past the refill ``target`` nor the cache's
    ``rows``; ``alive`` rows are in the batch after compaction."""
    return min(max(encode_batch, finished), target - alive, rows - alive)


def rra_chunks(admitted: int, encode_batch: int) -> int:
    """Chunks of at most ``encode_batch`` prompts an RRA encode phase of ``admitted`` prompts runs in (each
    split into one micro-batch per stage): a micro-batch never holds more than B_E / P prompts, the activation
    memory the plan was sized for."""
    return -(-admitted // encode_batch)


# --- WAA -------------------------------------------------------------------------------------------

def waa_cache_rows(plan) -> int:
    """Decode-side KV-cache rows of a WAA run: ``ceil(decode_batch) + encode_batch``."""
    return max(1, math.ceil(plan.estimate.decode_batch)) + plan.schedule.encode_batch


def split_by(items: list, size: int) -> list[list]:
    """``items`` in order, cut into chunks of ``size`` (the last may be smaller): WAA's decode micro-batches of B_m
    rows, and its encode batches of B_E requests."""
    return [items[i:i + size] for i in range(0, len(items), size)]


# --- reading a run ----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SteadyWindow:
    """The part of a run in the steady state the plan describes: the decode batch has reached its planned size
    and the queue still feeds it (no start-up ramp, no final drain). Marked by the executor that knows both."""

    start_s: float
    end_s: float
    encodes: slice
    """The encode phases (or batches) inside the window, as a slice of the run's list of them."""
    decode_iters: slice
    """The decode iterations inside the window."""

    def rate(self, finish: np.ndarray, encodes: list, decode_iters: list) -> float | None:
        """Completions per second inside the window, of the run's ``finish`` times; None when the window is empty,
        holds fewer than ``MIN_STEADY_FINISHES`` completions, or no encode or decode iteration of the run's lists
        (then a run is read whole)."""
        if self.end_s <= self.start_s or not encodes[self.encodes] or not decode_iters[self.decode_iters]:
            return None
        inside = int(((finish >= self.start_s) & (finish <= self.end_s)).sum())
        return inside / (self.end_s - self.start_s) if inside >= MIN_STEADY_FINISHES else None


@dataclass(frozen=True, slots=True)
class SteadyStop:
    """Ends a measurement run at the first phase boundary where its steady window holds at least ``phases`` encode
    phases and ``finishes`` requests finished inside it: what the window measures is then in, and the start-up ramp
    is the only part of the run outside it (no drain). The requests still running are reported failed ("the run
    ended before the request finished")."""

    finishes: int = MIN_STEADY_FINISHES
    phases: int = 2

    def __post_init__(self):
        whole(self.finishes, "steady stop finishes", MIN_STEADY_FINISHES)  # fewer: a report reads the run whole
        whole(self.phases, "steady stop phases", 1)

    def reached(self, marker: SteadyMarker, finished: int) -> bool:
        return marker.phases() >= self.phases and finished >= self.finishes


class SteadyMarker:
    """Helps a driver mark its ``SteadyWindow``: ``begin`` once the batch is full, ``end`` once the queue
    starves; the first call of each counts."""

    def __init__(self, encodes: list, decode_iters: list):
        self._enc, self._dec = encodes, decode_iters
        self._start: tuple[float, int, int] | None = None
        self._end: tuple[float, int, int] | None = None

    def begin(self, t: float) -> None:
        if self._start is None:
            self._start = (t, len(self._enc), len(self._dec))

    def end(self, t: float) -> None:
        if self._start is not None and self._end is None:
            self._end = (t, len(self._enc), len(self._dec))

    def phases(self) -> int:
        """Encode phases inside the window so far (0 before it begins)."""
        return 0 if self._start is None else len(self._enc) - self._start[1]

    def window(self, t_last: float) -> SteadyWindow | None:
        """The window (ending at ``t_last`` if the queue never starved), or None if the batch never filled."""
        if self._start is None:
            return None
        t0, e0, d0 = self._start
        t1, e1, d1 = self._end or (t_last, len(self._enc), len(self._dec))
        return SteadyWindow(t0, t1, slice(e0, e1), slice(d0, d1))



def steady_rate(finish: np.ndarray) -> float:
    """Completions per second between the 10 % and 90 % completion times of sorted ``finish`` times (NaN if that
    window is empty)."""
    n = len(finish)
    if n < 5:
        return math.nan
    lo, hi = int(math.floor(STEADY_LO * (n - 1))), int(math.ceil(STEADY_HI * (n - 1)))
    window = finish[hi] - finish[lo]
    return (hi - lo) / window if window > 0 else math.nan
