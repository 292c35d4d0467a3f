"""The budgeted profile against the full quick grid: cost, and the fidelity of the plans each predicts.

Every round, interleaved: the budgeted profile (``python -m profiler``'s default budget) and the full quick grid
(no budget, every point) are measured one after the other, then each of ``benchmarks/fidelity.py``'s plans runs
once on the runner; both profiles predict every run (the same schedule re-estimated on each), so that the two
errors are paired on the same measurement. Printed: each profile's wall time and peak RSS of the process (the
sweep's own growth), and per plan the medians over rounds of both errors, their difference, and the noise floor
of the runs (``benchmarks.fidelity.noise_floor``):

  python -m benchmarks.profile_budget [--model tiny] [--rounds 3] [--requests 400] [--plans rra,best]
"""

from __future__ import annotations

import argparse
import math
import resource
import statistics
import sys
import time

import torch

from exegpt import evaluate_schedule
from exegpt.policies import describe
from profiler.budget import DEFAULT_BUDGET_S
from profiler.loop import THREADS, run_and_compare
from profiler.sweep import profile_model

from .fidelity import cases, noise_floor, runnable_ranks


def _profile(model: str, budget_s: float | None):
    """A fresh profile and its wall seconds (one thread per rank, as the runs)."""
    t0 = time.perf_counter()
    prof = profile_model(model, tp_degrees=(1, 2), quick=True, progress=False, threads=THREADS, budget_s=budget_s)
    return prof, time.perf_counter() - t0


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--plans", help="only plans whose names start with one of these comma-separated prefixes")
    a = ap.parse_args()
    budget = DEFAULT_BUDGET_S["cpu" if not torch.cuda.is_available() else "cuda"]
    named, rows, costs = None, [], {"budgeted": [], "full": []}
    for r in range(a.rounds):
        profs = {}
        for name, b in (("budgeted", budget), ("full", None)) if r % 2 == 0 else (("full", None), ("budgeted", budget)):
            profs[name], wall = _profile(a.model, b)
            costs[name].append(wall)
            print(f"round {r + 1}: {name} profile {wall:.0f} s (peak RSS so far {_rss_gib():.2f} GiB)", file=sys.stderr,
                  flush=True)
        if named is None:  # the plans are chosen once, on the full grid's profile
            named = cases(profs["full"], runnable_ranks(profs["full"]))
            if a.plans:
                named = [(n, p) for n, p in named if n.startswith(tuple(a.plans.split(",")))]
        row = {}
        for name, plan in named:
            w = plan.workload
            c = run_and_compare([(name, plan)], a.model, num_requests=a.requests,
                                trace=w if w.pairs is not None else None)[0]
            meas = c.report.throughput_seq_s
            pred = {k: evaluate_schedule(plan.schedule, w, plan.bound, profile=p, devices=plan.devices
                                         ).estimate.throughput_seq_s for k, p in profs.items()}
            row[name] = (meas, {k: abs(v - meas) / meas for k, v in pred.items()})
        rows.append(row)
    print(f"profiles ({a.model}, tp 1 2, one thread; wall seconds per round): "
          f"budgeted {', '.join(f'{x:.0f}' for x in costs['budgeted'])}; "
          f"full quick grid {', '.join(f'{x:.0f}' for x in costs['full'])}")
    print(f"  {'plan':<14} {'schedule':<34} {'err budgeted':>12} {'err full':>9} {'diff':>7} {'floor':>7}")
    diffs, floors = [], []
    for name, plan in named:
        runs = [rw[name] for rw in rows]
        eb = statistics.median(x[1]["budgeted"] for x in runs)
        ef = statistics.median(x[1]["full"] for x in runs)
        floor = noise_floor([[x[0] for x in runs]])
        fl = statistics.median(floor) if floor else math.nan
        diffs.append(eb - ef)
        floors.append(fl)
        print(f"  {name:<14} {describe(plan.schedule):<34} {100 * eb:>11.1f}% {100 * ef:>8.1f}% "
              f"{100 * (eb - ef):>+6.1f}% {100 * fl:>6.1f}%")
    known = [f for f in floors if math.isfinite(f)]
    print(f"throughput error, budgeted - full: mean {100 * statistics.mean(diffs):+.1f} points, worst "
          f"{100 * max(diffs):+.1f}; noise floor median {100 * statistics.median(known) if known else math.nan:.1f}%")


if __name__ == "__main__":
    main()
