"""The profiler's time budget: what a sweep measures, planned before it starts, and the clock it runs against.

A budgeted sweep (``profile_model(budget_s=...)``, CLI ``--budget 5m``) splits its budget between phases
(``PHASE_SHARES``: the kernel tables, the collectives, the executor's calibration); a phase that needs less than
its share leaves the rest to the next. Within the kernel phase every candidate point of every table is priced by
``CostModel`` (the seconds its measurement takes: warm-up plus repeats of one call, each call a per-call
overhead plus its work, FLOPs, over a rate; both learned from the points already measured, first from a short
probe) and ``select_points`` keeps, per table, its cheapest points (at least ``MIN_POINTS``: what a fit needs), then
the cheapest points over all tables while their sum fits the phase's time. The rest are filled from fits of
the known form (``profiler.fit``). Cheap points are the small sizes, where times change shape; the expensive ones
are large, where the forms hold.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import nnls

from exegpt.errors import ExeGPTError

DEFAULT_BUDGET_S = {"cpu": 300.0, "cuda": 600.0}
"""Budget of a sweep when none is given, per device type (seconds): a usable profile of a small model in minutes
(the sweep stops sooner when its grid is measured)."""
PHASE_SHARES = {"kernels": 0.45, "collectives": 0.15, "engine": 0.40}
"""Shares of the budget of the kernel tables, the collectives and the executor's calibration (engine and WAA
runs); what a phase leaves goes to the later ones."""
MIN_POINTS = 4
"""Points measured in every table whatever the budget (the cheapest ones): enough for its fit."""
POINT_SETUP_S = 2e-3
"""Seconds of building one point's inputs and bookkeeping, beyond its timed calls."""
RETRY_FACTOR = 1.25
LONG_CALL_S, LONG_CALLS = 0.25, 4
"""A call priced above ``LONG_CALL_S`` seconds is made ``LONG_CALLS`` times (``profiler.tables.LONG_CALL_S``)."""
"""Expected share of re-timed calls (noisy points and spikes are timed again)."""
PRIOR_CALL_S = {"cpu": 3e-5, "cuda": 1e-5}
"""Fixed seconds per call before any is measured."""
PRIOR_RATE = {"cpu": 1e10, "cuda": 1e13}
"""FLOP/s before any call is measured."""
MAX_POINT_SHARE = 0.1
"""Largest share of the kernel phase's time one point may take (beyond a table's minimum): a single costly point
would stake the budget on the price of one call."""
MEMORY_CAP_BYTES = 2 ** 30
"""Most bytes one measured point may allocate (its KV cache and attention inputs); larger points are fitted."""

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str | float | int) -> float:
    """Seconds of a duration such as ``300``, ``90s``, ``5m``, ``1m30s`` or ``1h``; one-line ``ExeGPTError`` on
    anything else or on a duration <= 0."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        s = str(text).strip().lower()
        parts = re.fullmatch(r"((\d+(\.\d*)?)([smh]))+|\d+(\.\d*)?", s)
        if not parts:
            raise ExeGPTError(f"budget {text!r} is not a duration; expected e.g. 300, 90s, 5m, 1m30s or 1h")
        parts = re.findall(r"(\d+(\.\d*)?)([smh])", s)
        seconds = float(s) if s[-1].isdigit() else sum(float(v) * _UNITS[u] for v, _, u in parts)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ExeGPTError(f"budget {text!r} must be a duration > 0, e.g. 5m")
    return seconds


def format_duration(seconds: float) -> str:
    """``75.3`` -> ``1m15s``; under a minute ``42s`` (or ``4.2s``, ``0.05s``)."""
    if seconds < 1:
        return f"{seconds:.2g}s"
    if seconds < 10:
        return f"{seconds:.1f}s"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


@dataclass
class Clock:
    """The budget's clock: started at construction (``time.monotonic``)."""

    budget_s: float
    started: float = field(default_factory=time.monotonic)

    def spent_s(self) -> float:
        return time.monotonic() - self.started

    def left_s(self) -> float:
        return self.budget_s - self.spent_s()

    def status(self) -> str:
        """``1m12s of 5m00s, 3m48s left`` (without a budget: ``1m12s``)."""
        if math.isinf(self.budget_s):
            return format_duration(self.spent_s())
        return (f"{format_duration(self.spent_s())} of {format_duration(self.budget_s)}, "
                f"{format_duration(max(0.0, self.left_s()))} left")


class CostModel:
    """Seconds of one timed call, ``overhead + work / rate`` per kernel, learned from measured calls (non-negative
    least squares of the relative error); kernels with fewer than two calls of different work use the machine's
    rate (the slowest rate learned so far, else ``PRIOR_RATE``) and ``PRIOR_CALL_S``."""

    def __init__(self, device_type: str, calls_per_point: int):
        self.calls_per_point = calls_per_point
        self.prior_call_s = PRIOR_CALL_S.get(device_type, PRIOR_CALL_S["cpu"])
        self.machine_rate = PRIOR_RATE.get(device_type, PRIOR_RATE["cpu"])
        self._obs: dict[str, list[tuple[float, float]]] = {}
        self._model: dict[str, tuple[float, float]] = {}

    def observe(self, kernel: str, work: float, call_s: float) -> None:
        """One measured call (median seconds) of ``kernel`` at ``work`` FLOPs."""
        obs = self._obs.setdefault(kernel, [])
        obs.append((float(work), max(float(call_s), 1e-9)))
        w, t = (np.array(c) for c in zip(*obs))
        if len(set(w)) >= 2:
            (a, b), _ = nnls(np.stack([np.ones_like(w), w], axis=1) / t[:, None], np.ones_like(t))
            if b > 0:
                self._model[kernel] = (a, 1.0 / b)
        # The slowest rate seen prices kernels not yet measured: over-estimating keeps the sweep in its budget.
        rates = [r for _, r in self._model.values()] or [w / t for o in self._obs.values() for w, t in o if w > 0]
        if rates:
            self.machine_rate = min(rates)

    def call_s(self, kernel: str, work: float) -> float:
        a, rate = self._model.get(kernel, (self.prior_call_s, self.machine_rate))
        return a + work / rate

    def point_s(self, kernel: str, work: float) -> float:
        """Seconds to measure one point: its calls (warm-up and repeats, some re-timed; fewer for a long call,
        ``profiler.tables.LONG_CALL_S``) and its setup."""
        call = self.call_s(kernel, work)
        calls = LONG_CALLS if call > LONG_CALL_S else RETRY_FACTOR * self.calls_per_point
        return calls * call + POINT_SETUP_S


@dataclass(frozen=True, slots=True)
class Candidates:
    """One table's candidate points: their grid indices, work (FLOPs) and bytes allocated."""

    kernel: str
    tp: int
    axes: tuple[tuple[int, ...], ...]
    index: tuple[tuple[int, ...], ...]
    work: tuple[float, ...]
    memory_bytes: tuple[float, ...]

    @property
    def name(self) -> str:
        return f"{self.kernel} tp={self.tp}"


@dataclass(frozen=True, slots=True)
class TablePlan:
    """What one table measures (grid indices, in measurement order: cheapest first) and fits."""

    candidates: Candidates
    measure: tuple[tuple[int, ...], ...]
    estimate_s: float

    @property
    def num_fitted(self) -> int:
        return len(self.candidates.index) - len(self.measure)

    def describe(self) -> str:
        """``attn_encode tp=1: measure 30 of 40 points (~12s), fit 10 (the costliest, up to 64 x 8192)``."""
        c = self.candidates
        full = " x ".join(str(a[-1]) for a in c.axes)
        fit = f", fit {self.num_fitted} (the costliest, up to {full})" if self.num_fitted else ""
        return f"{c.name}: measure {len(self.measure)} of {len(c.index)} points (~{format_duration(self.estimate_s)})" \
               f"{fit}"


def select_points(tables: list[Candidates], cost: CostModel, allot_s: float) -> list[TablePlan]:
    """Per table its ``MIN_POINTS`` cheapest points, then the cheapest points over all tables while their summed
    cost fits ``allot_s`` seconds; points above ``MEMORY_CAP_BYTES`` or ``MAX_POINT_SHARE`` of ``allot_s`` only as a
    table's minimum."""
    chosen: list[set[int]] = []
    spent = 0.0
    rest = []
    for t, c in enumerate(tables):
        costs = [cost.point_s(c.kernel, w) for w in c.work]
        order = sorted(range(len(c.index)), key=lambda i: costs[i])
        keep = set(order[:MIN_POINTS])
        chosen.append(keep)
        spent += sum(costs[i] for i in keep)
        rest += [(costs[i], t, i) for i in order[MIN_POINTS:]
                 if c.memory_bytes[i] <= MEMORY_CAP_BYTES and costs[i] <= MAX_POINT_SHARE * allot_s]
    for s, t, i in sorted(rest):
        if spent + s > allot_s:
            break
        chosen[t].add(i)
        spent += s
    out = []
    for c, keep in zip(tables, chosen):
        order = sorted(keep, key=lambda i: cost.point_s(c.kernel, c.work[i]))
        out.append(TablePlan(candidates=c, measure=tuple(c.index[i] for i in order),
                             estimate_s=sum(cost.point_s(c.kernel, c.work[i]) for i in order)))
    return out


def minimum_s(plans: list[TablePlan], cost: CostModel) -> float:
    """Seconds of the points every table measures whatever the budget."""
    total = 0.0
    for p in plans:
        c = p.candidates
        total += sum(sorted(cost.point_s(c.kernel, w) for w in c.work)[:MIN_POINTS])
    return total
