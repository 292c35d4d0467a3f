"""Layer placement: how many contiguous layers each pipeline stage holds (CP-SAT).

Stages differ (partial TP makes some stages TP groups that run a layer faster and hold more
memory; the last stage also runs the LM head), so an even split is not balanced. We solve

    minimise   max_s  n_s * layer_s[s] + fixed_s[s]               (the bottleneck stage)
    subject to sum_s n_s = L,  n_s >= 1,
               n_s * layer_bytes[s] + fixed_bytes[s] <= capacity  (weights fit each device)

with OR-tools CP-SAT (one worker: deterministic). Runs of identical stages are one variable each,
their layers spread evenly with the remainder on the earliest stages. Results are cached: a search
asks for the same few placements thousands of times.
"""

from __future__ import annotations

from functools import lru_cache

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
    spreads a class's layers evenly, so CP-SAT decides only each class's largest per-stage count."""
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
    from ortools.sat.python import cp_model  # imported lazily: 0.7 s, and only the search needs it

    n_stages = len(t)
    # Upper bounds on layers per stage from memory; infeasible if the stage cannot hold one layer.
    others = sum(size) - 1
    hi = [n_layers - others if wb[s] == 0 else min(n_layers - others, (cap - fb[s]) // wb[s])
          for s in range(n_stages)]
    if min(hi) < 1 or sum(h * c for h, c in zip(hi, size)) < n_layers:
        return None

    def build():
        model = cp_model.CpModel()
        # peak[s]: layers on the fullest stage of class s; total[s]: layers on the whole class.
        peak = [model.new_int_var(1, hi[s], f"peak_{s}") for s in range(n_stages)]
        n = [model.new_int_var(size[s], hi[s] * size[s], f"layers_{s}") for s in range(n_stages)]
        bottleneck = model.new_int_var(0, max(t) * n_layers + max(f), "bottleneck")
        # Every layer is placed exactly once.
        model.add(sum(n) == n_layers)
        # An even spread puts at most ceil(total / size) layers on one stage of a class.
        for s in range(n_stages):
            model.add(n[s] <= peak[s] * size[s])
            model.add(n[s] >= (peak[s] - 1) * size[s] + 1)
        # The bottleneck is at least every stage's time.
        for s in range(n_stages):
            model.add(bottleneck >= peak[s] * t[s] + f[s])
        return model, n, bottleneck

    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 1  # deterministic, and the model is tiny
    solver.parameters.max_time_in_seconds = 5.0
    model, n, bottleneck = build()
    model.minimize(bottleneck)
    if solver.solve(model) not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None
    return tuple(int(solver.value(x)) for x in n)


def bottleneck_s(counts, layer_s, fixed_s) -> float:
    return max(c * t + f for c, t, f in zip(counts, layer_s, fixed_s))
