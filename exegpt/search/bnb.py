"""Branch and bound over integer boxes (the paper's Algorithm 1, n-dimensional), and its exhaustive twin.

A *space* is an integer box ``[lo, hi]`` with a vectorised *box function*
``f(lo, hi) -> (throughput_upper, latency_lower, may_fit)`` over arrays of box corners
(shape ``[n, d]``); for a one-point box (``lo == hi``) it returns the point's exact throughput,
latency and fit. Several spaces (one per policy and device layout) share one best-first queue,
so the best schedule found in any layout prunes all the others.

Rules (one comment each in the code):
  * a space with a cheap ``prebound`` enters the queue as that bound, its root evaluated only when popped;
  * split the popped box into ``fanout`` parts along every side (one evaluation bounds all the children; the
    paper halves the longest side, which takes more, smaller evaluations to reach the same boxes);
  * drop a box whose lowest latency already violates the bound (+ eps_latency x bound);
  * drop a box that cannot fit (memory, profiled range) even at its smallest point;
  * drop a box whose best throughput cannot beat the incumbent by more than eps_throughput;
  * enumerate boxes of at most ``leaf`` points directly.
With exact (sound) box bounds and zero tolerances the result is the exhaustive optimum; positive
tolerances trade that guarantee for speed where bounds are only approximate (paper §5.1).
Where no point meets the bound, the search goes on from the boxes the bound dropped for the lowest-latency point
(the smallest feasible bound the error names) instead of searching the spaces again.
"""

from __future__ import annotations

import dataclasses
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
    prebound: Callable[[], tuple[float, float]] | None = None
    """Optional: a cheap (throughput upper, latency lower) bound of every point of the space that fits: the space's
    root box is evaluated only once this bound is popped from the queue, so that a space the incumbent or the
    latency bound already rules out costs one call of this and nothing more."""

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
    fastest: SearchResult | None = None
    """Where nothing meets the bound: the lowest-latency point of the spaces (the smallest feasible bound; space
    None if nothing fits), found by going on from the boxes the bound dropped (``branch_and_bound``)."""

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


_ROOT = None  # the box of a queue entry whose space's root is not evaluated yet (its ``prebound``)


def branch_and_bound(spaces: list[Space], bound_s: float, eps_throughput: float = 0.0, eps_latency: float = 0.0,
                     minimize_latency: bool = False, leaf: int = 16, batch: int = 16,
                     fanout: int = 4) -> SearchResult:
    """Best point of ``spaces``: the highest throughput with latency <= bound_s, or with
    ``minimize_latency`` the lowest latency of any point that fits (the bound is ignored). Where no point meets
    the bound, the result's ``fastest`` is the lowest-latency point, searched on from what the bound dropped."""
    t0 = time.perf_counter()
    counts = [0, 0, 0]  # points, bounds evaluated, boxes pruned
    dropped: list = []  # (latency lower bound, space, lo, hi) of boxes that fit but violate the latency bound
    res = _search(spaces, [], bound_s * (1 + eps_latency), bound_s, eps_throughput, minimize_latency, leaf, batch,
                  fanout, counts, dropped)
    fastest = None
    if res[1] is None and not minimize_latency:
        # Nothing meets the bound: the lowest latency is that of a point evaluated already or inside a dropped box.
        fastest = _result(spaces, _search(spaces, dropped, math.inf, math.inf, 0.0, True, leaf, batch, fanout,
                                          counts, None, res[4]), counts, t0)
    return dataclasses.replace(_result(spaces, res, counts, t0), fastest=fastest)


def _result(spaces, res, counts, t0) -> SearchResult:
    _, si, point, lat, _ = res
    if si is None:
        return SearchResult(None, None, 0.0, math.inf, *counts, time.perf_counter() - t0)
    thr = float(np.ravel(spaces[si].fn(np.array([point]), np.array([point]))[0])[0])
    return SearchResult(si, point, thr, lat, *counts, time.perf_counter() - t0)


def _search(spaces, seeds, lat_limit, bound_s, eps_throughput, minimize_latency, leaf, batch, fanout, counts,
            dropped, fastest_seen=None):
    """The best-first search (module doc). ``seeds``: (latency lower bound, space, lo, hi) boxes to start from
    (none: every space's root); ``dropped`` collects the boxes the latency bound drops; returns (score, space,
    point, latency, the lowest-latency fitting point evaluated as (-latency, space, point, latency))."""
    none = (-math.inf, None, None, math.inf)
    fastest = fastest_seen or none  # the lowest-latency fitting point evaluated, as (-latency, space, point, latency)
    best = fastest if minimize_latency else none  # (score, space, point, latency)
    heap: list = []
    tie = itertools.count()

    def beaten(up):
        # The incumbent, padded by the throughput tolerance (nothing beats -inf padding).
        inc = best[0]
        return up <= (inc + abs(inc) * eps_throughput if math.isfinite(inc) else inc)

    def score(thr, lat):
        return -lat if minimize_latency else thr

    def queue(si, up, lat, lo, hi):
        # Drop boxes whose lowest latency violates the bound (kept aside while nothing meets it) or that cannot
        # beat the incumbent (by more than the throughput tolerance).
        if lat > lat_limit:
            counts[2] += 1
            if dropped is not None:
                dropped.append((lat, si, lo, hi))
        elif beaten(up):
            counts[2] += 1
        else:
            heapq.heappush(heap, (-up, next(tie), si, lo, hi))

    def push(si, los, his):
        thr, lat, ok = _eval(spaces[si], los, his)
        counts[1] += len(los)
        up = score(thr, lat)
        counts[2] += int((~ok).sum())  # drop boxes that cannot fit
        for i in np.flatnonzero(ok):
            queue(si, float(up[i]), float(lat[i]), tuple(los[i]), tuple(his[i]))

    def enumerate_points(si, pts):
        nonlocal best, fastest
        thr, lat, ok = _eval(spaces[si], pts, pts)
        counts[0] += len(pts)
        if ok.any():
            i = int(np.argmin(np.where(ok, lat, np.inf)))
            if -lat[i] > fastest[0]:
                fastest = (-float(lat[i]), si, tuple(int(v) for v in pts[i]), float(lat[i]))
        feasible = ok & (lat <= bound_s)
        if feasible.any():
            sc = np.where(feasible, score(thr, lat), -np.inf)
            i = int(np.argmax(sc))
            if sc[i] > best[0]:
                best = (float(sc[i]), si, tuple(int(v) for v in pts[i]), float(lat[i]))

    if seeds:
        for lat, si, lo, hi in seeds:
            queue(si, -lat if minimize_latency else math.inf, lat, lo, hi)
    else:
        for si, sp in enumerate(spaces):
            if sp.prebound is None:
                push(si, np.array([sp.lo]), np.array([sp.hi]))
            else:
                up, lat = sp.prebound()
                queue(si, score(up, lat), lat, _ROOT, _ROOT)

    while heap:
        popped = []
        while heap and len(popped) < batch:
            neg_up, _, si, lo, hi = heapq.heappop(heap)
            # Drop boxes that the incumbent found since they were queued already beats.
            if beaten(-neg_up):
                counts[2] += 1
                continue
            popped.append((si, lo, hi))
        children: dict[int, list] = {}
        leaves: dict[int, list] = {}
        for si, lo, hi in popped:
            if lo is _ROOT:  # a space's cheap bound came first: now its root box
                children.setdefault(si, []).append((spaces[si].lo, spaces[si].hi))
                continue
            sizes = [b - a + 1 for a, b in zip(lo, hi)]
            if int(np.prod(sizes)) <= leaf:
                leaves.setdefault(si, []).append(_points(lo, hi))
                continue
            children.setdefault(si, []).extend(_split(lo, hi, fanout))
        for si, pts in leaves.items():
            enumerate_points(si, np.concatenate(pts))
        for si, boxes in children.items():
            push(si, np.array([b[0] for b in boxes]), np.array([b[1] for b in boxes]))
    return best + (fastest,)


def _split(lo, hi, fanout: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The box cut into ``fanout`` near-equal parts along every side (fewer where a side is shorter): one
    evaluation then bounds all the children, a few levels above where halving would reach."""
    cuts = []
    for a, b in zip(lo, hi):
        k = min(fanout, b - a + 1)
        edges = [a + (b - a + 1) * i // k for i in range(k + 1)]
        cuts.append([(edges[i], edges[i + 1] - 1) for i in range(k)])
    return [(tuple(c[0] for c in combo), tuple(c[1] for c in combo)) for combo in itertools.product(*cuts)]


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
