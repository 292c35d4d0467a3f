"""Branch and bound over integer boxes (the paper's Algorithm 1, n-dimensional), and its exhaustive twin.

A *space* is an integer box ``[lo, hi]`` with a vectorised *box function*
``f(lo, hi) -> (throughput_upper, latency_lower, may_fit)`` over arrays of box corners
(shape ``[n, d]``); for a one-point box (``lo == hi``) it returns the point's exact throughput,
latency and fit. Several spaces (one per policy and device layout) share one best-first queue,
so the best schedule found in any layout prunes all the others.

Rules (one comment each in the code):
  * split the popped box along its longest side (the paper's fallback rule, used in n-D);
  * drop a box whose lowest latency already violates the bound (+ eps_latency x bound);
  * drop a box that cannot fit (memory, profiled range) even at its smallest point;
  * drop a box whose best throughput cannot beat the incumbent by more than eps_throughput;
  * enumerate boxes of at most ``leaf`` points directly.
With exact (sound) box bounds and zero tolerances the result is the exhaustive optimum; positive
tolerances trade that guarantee for speed where bounds are only approximate (paper §5.1).
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

BoxFn = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Space:
    fn: BoxFn
    lo: tuple[int, ...]
    hi: tuple[int, ...]
    admissible: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
    """Optional: whether a box holds any admissible point (e.g. WAA's split rule); points that are not
    admissible are infeasible."""

    @property
    def size(self) -> int:
        return int(np.prod([h - l + 1 for l, h in zip(self.lo, self.hi)]))


@dataclass(frozen=True)
class SearchResult:
    space: int | None
    """Index of the space holding the best point (None if nothing is feasible)."""
    point: tuple[int, ...] | None
    throughput: float
    latency: float
    points_evaluated: int
    bounds_evaluated: int
    boxes_pruned: int
    wall_s: float

    @property
    def candidates_evaluated(self) -> int:
        return self.points_evaluated + self.bounds_evaluated


def _eval(space: Space, lo: np.ndarray, hi: np.ndarray):
    thr, lat, ok = space.fn(lo, hi)
    shape = (len(lo),)
    thr, lat, ok = (np.broadcast_to(np.asarray(a), shape) for a in (thr, lat, ok))
    if space.admissible is not None:
        ok = ok & space.admissible(lo, hi)
    return thr, lat, ok


def branch_and_bound(spaces: list[Space], bound_s: float, eps_throughput: float = 0.0, eps_latency: float = 0.0,
                     minimize_latency: bool = False, leaf: int = 16, batch: int = 16) -> SearchResult:
    """Best point of ``spaces``: the highest throughput with latency <= bound_s, or with
    ``minimize_latency`` the lowest latency of any point that fits (the bound is ignored)."""
    t0 = time.perf_counter()
    lat_limit = math.inf if minimize_latency else bound_s * (1 + eps_latency)
    best = (-math.inf, None, None, math.inf)  # (score, space, point, latency)
    heap: list = []
    tie = itertools.count()
    n_points = n_bounds = n_pruned = 0

    def beaten(up):
        # The incumbent, padded by the throughput tolerance (nothing beats -inf padding).
        inc = best[0]
        return up <= (inc + abs(inc) * eps_throughput if math.isfinite(inc) else inc)

    def score(thr, lat):
        return -lat if minimize_latency else thr

    def keep(up, lat_lo, ok):
        # Drop boxes that cannot fit, whose lowest latency violates the bound, or that cannot beat
        # the incumbent (by more than the throughput tolerance).
        return ok & (lat_lo <= lat_limit) & ~beaten(up)

    def push(si, los, his):
        nonlocal n_bounds, n_pruned
        thr, lat, ok = _eval(spaces[si], los, his)
        n_bounds += len(los)
        up = score(thr, lat)
        mask = keep(up, lat, ok)
        n_pruned += int((~mask).sum())
        for i in np.flatnonzero(mask):
            heapq.heappush(heap, (-float(up[i]), next(tie), si, tuple(los[i]), tuple(his[i])))

    def enumerate_points(si, pts):
        nonlocal best, n_points
        thr, lat, ok = _eval(spaces[si], pts, pts)
        n_points += len(pts)
        feasible = ok & (lat <= (math.inf if minimize_latency else bound_s))
        if feasible.any():
            sc = np.where(feasible, score(thr, lat), -np.inf)
            i = int(np.argmax(sc))
            if sc[i] > best[0]:
                best = (float(sc[i]), si, tuple(int(v) for v in pts[i]), float(lat[i]))

    for si, sp in enumerate(spaces):
        push(si, np.array([sp.lo]), np.array([sp.hi]))

    while heap:
        popped = []
        while heap and len(popped) < batch:
            neg_up, _, si, lo, hi = heapq.heappop(heap)
            # Drop boxes that the incumbent found since they were queued already beats.
            if beaten(-neg_up):
                n_pruned += 1
                continue
            popped.append((si, lo, hi))
        children: dict[int, list] = {}
        leaves: dict[int, list] = {}
        for si, lo, hi in popped:
            sizes = [b - a + 1 for a, b in zip(lo, hi)]
            if int(np.prod(sizes)) <= leaf:
                leaves.setdefault(si, []).append(_points(lo, hi))
                continue
            # Split along the longest side.
            ax = int(np.argmax(sizes))
            mid = (lo[ax] + hi[ax]) // 2
            hi1 = list(hi); hi1[ax] = mid
            lo2 = list(lo); lo2[ax] = mid + 1
            children.setdefault(si, []).extend([(lo, tuple(hi1)), (tuple(lo2), hi)])
        for si, pts in leaves.items():
            enumerate_points(si, np.concatenate(pts))
        for si, boxes in children.items():
            push(si, np.array([b[0] for b in boxes]), np.array([b[1] for b in boxes]))

    score_, si, point, lat = best
    if si is None:
        return SearchResult(None, None, 0.0, math.inf, n_points, n_bounds, n_pruned, time.perf_counter() - t0)
    thr = float(np.ravel(spaces[si].fn(np.array([point]), np.array([point]))[0])[0])
    return SearchResult(si, point, thr, lat, n_points, n_bounds, n_pruned, time.perf_counter() - t0)


def _points(lo, hi) -> np.ndarray:
    """Every integer point of the box [lo, hi], shape [n, d]."""
    axes = [np.arange(a, b + 1) for a, b in zip(lo, hi)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(lo))


def exhaustive(spaces: list[Space], bound_s: float, minimize_latency: bool = False,
               chunk: int = 65536) -> SearchResult:
    """Evaluate every point of every space (the reference the search is tested against)."""
    t0 = time.perf_counter()
    best = (-math.inf, None, None, math.inf, 0.0)
    n = 0
    for si, sp in enumerate(spaces):
        pts = _points(sp.lo, sp.hi)
        for start in range(0, len(pts), chunk):
            p = pts[start:start + chunk]
            thr, lat, ok = _eval(sp, p, p)
            n += len(p)
            feasible = ok & (lat <= (math.inf if minimize_latency else bound_s))
            if not feasible.any():
                continue
            sc = np.where(feasible, -lat if minimize_latency else thr, -np.inf)
            i = int(np.argmax(sc))
            if sc[i] > best[0]:
                best = (float(sc[i]), si, tuple(int(v) for v in p[i]), float(lat[i]), float(thr[i]))
    _, si, point, lat, thr = best
    return SearchResult(si, point, thr if si is not None else 0.0, lat, n, 0, 0, time.perf_counter() - t0)


def grid_values(space: Space) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """Axes and the throughput, latency and fit of every point of a 2-D space, shaped [n0, n1]."""
    axes = [np.arange(a, b + 1) for a, b in zip(space.lo, space.hi)]
    pts = _points(space.lo, space.hi)
    thr, lat, ok = _eval(space, pts, pts)
    shape = tuple(len(a) for a in axes)
    return axes, thr.reshape(shape), lat.reshape(shape), ok.reshape(shape)
