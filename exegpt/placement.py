"""Layer placement: how many contiguous layers each pipeline stage holds.

Stages differ (partial TP makes some stages TP groups that run a layer faster and hold more
memory; the last stage also runs the LM head), so an even split is not balanced. We solve

    minimise   max_s  n_s * layer_s[s] + fixed_s[s]               (the bottleneck stage)
    subject to sum_s n_s = L,  n_s >= 1,
               n_s * layer_bytes[s] + fixed_bytes[s] <= capacity  (weights fit each device)

exactly, by a threshold search on the bottleneck: a bottleneck T is reachable iff every stage can hold at least one
layer within T (and its memory) and together they hold at least L, which only gets easier as T grows; so the
optimum is the least T among the values n * layer_s[s] + fixed_s[s] that is reachable (a bisection over them).
Stages then take as many layers as T allows, and the layers over L come off the slowest stages first (the most
balanced of the optimal placements). Runs of identical stages are one class, their layers spread evenly with the
remainder on the earliest stages. Times are compared as integers (relative to the fastest stage) so that ties are
exact; results are cached: a search asks for the same placements across device counts and layouts.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

_TIME_UNITS = 10_000  # per-layer times scaled to integers relative to the fastest stage


def place_layers(n_layers: int, layer_s, fixed_s, layer_bytes, fixed_bytes,
                 capacity_bytes: float) -> tuple[int, ...] | None:
    """Layers per stage, or None when the weights cannot fit (or there are more stages than layers)."""
    if len(layer_s) > n_layers:
        return None
    unit = min(min(layer_s), min([f for f in fixed_s if f > 0], default=min(layer_s))) or 1e-12
    t = tuple(max(1, round(x / unit * _TIME_UNITS)) for x in layer_s)
    f = tuple(round(x / unit * _TIME_UNITS) for x in fixed_s)
    mb = 1 << 20
    cap = int(capacity_bytes // mb) if capacity_bytes != float("inf") else 1 << 40
    wb = tuple(int(-(-b // mb)) for b in layer_bytes)
    fb = tuple(int(-(-b // mb)) for b in fixed_bytes)
    return _solve(n_layers, t, f, wb, fb, cap)


@lru_cache(maxsize=4096)
def _solve(n_layers: int, t: tuple, f: tuple, wb: tuple, fb: tuple, cap: int) -> tuple[int, ...] | None:
    """Identical stages form one class (a run of equal (time, fixed, bytes) stages); a min-max optimum
    spreads a class's layers evenly, so only each class's total is decided."""
    classes: list[list[int]] = []
    for s in range(len(t)):
        if classes and (t[s], f[s], wb[s], fb[s]) == (t[classes[-1][0]], f[classes[-1][0]], wb[classes[-1][0]],
                                                     fb[classes[-1][0]]):
            classes[-1].append(s)
        else:
            classes.append([s])
    rep = [c[0] for c in classes]
    size = tuple(len(c) for c in classes)
    per_class = _solve_classes(n_layers, tuple(t[r] for r in rep), tuple(f[r] for r in rep),
                               tuple(wb[r] for r in rep), tuple(fb[r] for r in rep), size, cap)
    if per_class is None:
        return None
    counts = []
    for total, c in zip(per_class, size):
        base, extra = divmod(total, c)
        counts += [base + 1] * extra + [base] * (c - extra)  # front-load the remainder
    return tuple(counts)


def _solve_classes(n_layers: int, t: tuple, f: tuple, wb: tuple, fb: tuple, size: tuple,
                   cap: int) -> tuple[int, ...] | None:
    """Layers of each class (``size[s]`` identical stages) at the least bottleneck (module doc)."""
    t_, f_, size_ = (np.array(x, dtype=np.int64) for x in (t, f, size))
    # Most layers one stage of each class holds: memory, and a layer left for every other stage.
    others = int(size_.sum()) - 1
    hi = np.array([n_layers - others if wb[s] == 0 else min(n_layers - others, (cap - fb[s]) // wb[s])
                   for s in range(len(t))], dtype=np.int64)
    if hi.min() < 1 or int((hi * size_).sum()) < n_layers:
        return None

    def caps(T):  # layers per stage of each class within bottleneck T (and memory)
        return np.minimum(hi, (T - f_) // t_)

    def reachable(T) -> bool:
        c = caps(T)
        return bool(c.min() >= 1 and (c * size_).sum() >= n_layers)

    # The optimum is a stage time n * t + f: bisect the sorted candidates for the least reachable one.
    cand = np.unique(np.concatenate([np.arange(1, h + 1) * ts + fs for h, ts, fs in zip(hi, t_, f_)]))
    lo, up = 0, len(cand) - 1  # cand[up] is reachable: every stage at its memory limit holds >= L
    while lo < up:
        mid = (lo + up) // 2
        if reachable(cand[mid]):
            up = mid
        else:
            lo = mid + 1
    n = caps(cand[lo]) * size_
    # Take the layers over L off the slowest stage first (ties: the earliest class), keeping one per stage.
    for _ in range(int(n.sum()) - n_layers):
        n[int(np.argmax(np.where(n > size_, -(-n // size_) * t_ + f_, -1)))] -= 1
    return tuple(int(x) for x in n)


def bottleneck_s(counts, layer_s, fixed_s) -> float:
    return max(c * t + f for c, t, f in zip(counts, layer_s, fixed_s))
