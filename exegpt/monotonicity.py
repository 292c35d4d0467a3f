"""Monotonicity statistics of the schedule space, as in the paper's §7.8 (Table 5).

Each control variable is swept with all others fixed, over every combination of the others; a step
"up" the variable (B_E up, N_D down, B_m up, TP devices down at a fixed degree) should raise both
throughput and latency. A step is monotone in throughput when the throughput does not fall by more
than ``tolerance`` of its value, and in latency when the latency does not fall by more than
``tolerance`` of the reference bound (the paper uses 5 % and the 70th-percentile bound). Only steps
between two points that fit in memory are counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .schedule import Policy
from .search.bnb import grid_values
from .problem import Problem


@dataclass(frozen=True)
class MonotonicityRow:
    variable: str
    steps: int
    throughput_monotone: float
    """Fraction of steps monotone in throughput."""
    latency_monotone: float


def _count(thr: np.ndarray, lat: np.ndarray, ok: np.ndarray, axis: int, sign: int, tol: float, lat_tol: float):
    """Steps along ``axis`` in the 'up' direction ``sign``: (steps, monotone in thr, monotone in lat)."""
    if sign < 0:
        thr, lat, ok = (np.flip(a, axis) for a in (thr, lat, ok))
    a = [slice(None)] * thr.ndim
    b = [slice(None)] * thr.ndim
    a[axis], b[axis] = slice(None, -1), slice(1, None)
    a, b = tuple(a), tuple(b)
    both = ok[a] & ok[b]
    n = int(both.sum())
    thr_ok = (thr[b] >= thr[a] * (1 - tol)) & both
    lat_ok = (lat[b] >= lat[a] - lat_tol) & both
    return n, int(thr_ok.sum()), int(lat_ok.sum())


def monotonicity_stats(prob: Problem, layouts, tolerance: float = 0.05,
                       bound_s: float | None = None) -> list[MonotonicityRow]:
    """Per-variable monotonicity over the spaces ``layouts`` (pairs of Layout and Space from
    ``optimize.build_spaces``). ``bound_s`` defaults to the 70th percentile of feasible latencies."""
    grids = []
    for lay, space in layouts:
        axes, thr, lat, ok = grid_values(space)
        grids.append((lay, thr, lat, ok))
    lats = np.concatenate([g[2][g[3]] for g in grids]) if grids else np.array([])
    if bound_s is None:
        bound_s = float(np.percentile(lats, 70)) if lats.size else 1.0
    lat_tol = tolerance * bound_s
    acc: dict[str, list[int]] = {}

    def add(name, counts):
        row = acc.setdefault(name, [0, 0, 0])
        for i, c in enumerate(counts):
            row[i] += c

    for lay, thr, lat, ok in grids:
        if lay.policy is Policy.RRA:
            add("RRA B_E", _count(thr, lat, ok, 0, +1, tolerance, lat_tol))
            add("RRA N_D", _count(thr, lat, ok, 1, -1, tolerance, lat_tol))
        else:
            add("WAA B_E", _count(thr, lat, ok, 0, +1, tolerance, lat_tol))
            add("WAA B_m", _count(thr, lat, ok, 1, +1, tolerance, lat_tol))
    # TP devices at a fixed degree: fewer TP devices is "up" (deeper pipeline, more throughput).
    rra = [(lay, thr, lat, ok) for lay, thr, lat, ok in grids if lay.policy is Policy.RRA and lay.tp > 1]
    for t in sorted({lay.tp for lay, *_ in rra}):
        seq = sorted((g for g in rra if g[0].tp == t), key=lambda g: -g[0].tp_gpus)
        for (l1, t1, a1, o1), (l2, t2, a2, o2) in zip(seq, seq[1:]):
            stack = [np.stack([x, y]) for x, y in ((t1, t2), (a1, a2), (o1, o2))]
            add("RRA TP devices", _count(*stack, 0, +1, tolerance, lat_tol))
    rows = []
    for name, (n, t_ok, l_ok) in acc.items():
        rows.append(MonotonicityRow(name, n, t_ok / n if n else 1.0, l_ok / n if n else 1.0))
    return rows
