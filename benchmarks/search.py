"""Search benchmark: the paper's six models on their clusters, five tasks x four bounds (RRA, WAA-C, WAA-M).

Three tables:
  1. every case: the branch-and-bound search's wall time (``find_schedule``; where the bound is infeasible, the
     time to its error, which names the smallest feasible bound), candidates evaluated, the exhaustive optimum of
     the same space (run in parallel across cores after the timed searches, each under a time limit) and the gain
     over the FasterTransformer-style static-batching baseline at the same bound;
  2. per model and task: ``smallest_feasible_bound`` and ``find_schedule`` just below it (the infeasible path);
  3. per model: the best throughput with each device count forced (``device_counts=(c,)``, task S at twice its
     smallest bound), with the paper's WAA split rule and with the split searched, so a cliff is visible.
Bounds follow the paper (§7.1): static batching at batch sizes 1, 5, 9, ...; the 10th, 30th and 70th
percentiles of its latencies, plus infinity. Searches run one at a time (the timings); only the exhaustive
references run side by side.

  python benchmarks/search.py                 # everything
  python benchmarks/search.py --quick         # T5-11B and OPT-13B only, exhaustive limited to 60 s a case
  python benchmarks/search.py --exhaustive-max-devices 48 --exhaustive-limit 1e9   # every reference (hours)
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import statistics
import time

import numpy as np

from exegpt import InfeasibleBoundError, SearchSpace, Workload, exhaustive_schedule, find_schedule, \
    smallest_feasible_bound, static_schedule
from exegpt.errors import ExeGPTError
from exegpt.policies import describe
from exegpt.policies.static import baseline_layout as static_baseline_layout
from exegpt.policies.static import points as static_points
from exegpt.problem import problem
from exegpt.search.optimize import BOX_POLICIES
from exegpt.workload import TASKS

CLUSTERS = [("t5-11b", "8xA40"), ("opt-13b", "4xA40"), ("gpt3-39b", "16xA40"), ("gpt3-101b", "16xA100"),
            ("gpt3-175b", "16xA100"), ("gpt3-341b", "48xA40")]
SHORT = {"rra": "R", "waa_c": "C", "waa_m": "M"}


def static_bounds(w: Workload, model: str, devices: str) -> list[float]:
    """The paper's bounds: percentiles 10/30/70 of static-batching latencies at batch 1, 5, 9, ..."""
    prob = problem(w, math.inf, model=model, devices=devices)
    try:
        lay = static_baseline_layout(prob)
    except ExeGPTError:
        return []
    thr, lat, ok = static_points(prob, lay, np.arange(1, 257, 4))
    lat = lat[ok]
    if lat.size == 0:
        return []
    return [float(np.percentile(lat, q)) for q in (10, 30, 70)] + [math.inf]


POLICIES: tuple | None = BOX_POLICIES
"""The policies searched: the paper's (default) or None, every registered one (``--policies all``)."""


def timed_search(model, devices, task, bound):
    """(wall s, plan or None, the error's smallest bound or None)."""
    w = Workload.task(task)
    t0 = time.perf_counter()
    try:
        plan = find_schedule(w, bound, model=model, devices=devices, policies=POLICIES)
        return time.perf_counter() - t0, plan, None
    except InfeasibleBoundError as e:
        return time.perf_counter() - t0, None, e.smallest_feasible_s


def _exhaustive(case, out):
    model, devices, task, bound = case
    try:
        ref = exhaustive_schedule(Workload.task(task), bound, model=model, devices=devices, policies=BOX_POLICIES)
        out.put((case, ref.estimate.throughput_seq_s))
    except InfeasibleBoundError:
        out.put((case, 0.0))


def exhaustive_all(cases, jobs: int, limit_s: float) -> dict:
    """The exhaustive optimum of each case (None where it ran past ``limit_s``), ``jobs`` processes at a time."""
    ctx = mp.get_context("fork")
    out, results, pending, running = ctx.Queue(), {}, list(cases), {}
    while pending or running:
        while pending and len(running) < jobs:
            case = pending.pop(0)
            p = ctx.Process(target=_exhaustive, args=(case, out), daemon=True)
            p.start()
            running[case] = (p, time.perf_counter())
        time.sleep(0.2)
        while not out.empty():
            case, thr = out.get()
            results[case] = thr
        for case, (p, t0) in list(running.items()):
            if case in results or not p.is_alive():
                p.join(1)
                if not p.is_alive():
                    del running[case]
            elif time.perf_counter() - t0 > limit_s:
                p.kill()
                p.join()
                results[case] = None
                del running[case]
    while not out.empty():
        case, thr = out.get()
        results[case] = thr
    return results


def forced_counts(model, devices, split) -> str:
    """The best throughput at each forced device count (task S, twice its smallest bound): 'count:seq/s+policy'."""
    w = Workload.task("S")
    bound = 2 * smallest_feasible_bound(w, model=model, devices=devices)
    cells = []
    for c in range(1, int(devices.split("x")[0]) + 1):
        try:
            p = find_schedule(w, bound, model=model, devices=devices, policies=BOX_POLICIES, device_counts=(c,),
                              space=SearchSpace(waa_split=split))
            cells.append(f"{c}:{p.estimate.throughput_seq_s:.2f}{SHORT[p.schedule.policy.value]}")
        except (InfeasibleBoundError, ExeGPTError):
            cells.append(f"{c}:-")
    return f"bound {bound:.3g} s: " + " ".join(cells)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="T5-11B and OPT-13B only, exhaustive limit 60 s")
    ap.add_argument("--models", nargs="+", help="only these models")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), help="only these tasks")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="exhaustive references side by side")
    ap.add_argument("--exhaustive-limit", type=float, default=None,
                    help="seconds an exhaustive reference may run (default 600, --quick 60; 0: run none)")
    ap.add_argument("--exhaustive-max-devices", type=int, default=8,
                    help="the exhaustive reference only on clusters of at most this many devices (16 devices: ~8 "
                         "minutes a case on one core)")
    ap.add_argument("--no-forced", action="store_true", help="skip the forced device counts")
    ap.add_argument("--policies", choices=("paper", "all"), default="paper",
                    help="search the paper's RRA, WAA-C and WAA-M (default; the exhaustive reference covers them) or "
                         "every registered policy (find_schedule's default; no exhaustive reference)")
    args = ap.parse_args()
    global POLICIES
    if args.policies == "all":
        POLICIES = None
        args.exhaustive_limit = 0
    clusters = CLUSTERS[:2] if args.quick else CLUSTERS
    if args.models:
        clusters = [c for c in CLUSTERS if c[0] in args.models]
    limit = args.exhaustive_limit if args.exhaustive_limit is not None else (60.0 if args.quick else 600.0)

    rows, walls = [], []
    for model, devices in clusters:
        for task in args.tasks:
            for bound in static_bounds(Workload.task(task), model, devices):
                wall, plan, smallest = timed_search(model, devices, task, bound)
                walls.append(wall)
                rows.append(((model, devices, task, bound), wall, plan, smallest))
    small = [r[0] for r in rows if int(r[0][1].split("x")[0]) <= args.exhaustive_max_devices]
    refs = exhaustive_all(small, args.jobs, limit) if limit else {}

    header = (f"{'model':<10} {'devices':<8} {'task':<4} {'bound s':>8} {'best schedule':<40} {'seq/s':>7} "
              f"{'gain':>5} {'search s':>8} {'cands':>6} {'exhaustive':>10} {'same':>4}")
    print(header)
    print("-" * len(header))
    agree = ran = 0
    for case, wall, plan, smallest in rows:
        model, devices, task, bound = case
        got = plan.estimate.throughput_seq_s if plan is not None else 0.0
        what = describe(plan.schedule) if plan is not None else f"infeasible (smallest {smallest:.3g} s)"
        ref = refs.get(case)
        same = "-"
        if ref is not None:
            ran += 1
            ok = math.isclose(ref, got, rel_tol=1e-9, abs_tol=1e-12)
            agree += ok
            same = "yes" if ok else "NO"
        cands = plan.search.candidates_evaluated if plan is not None else 0
        try:
            gain = got / static_schedule(Workload.task(task), bound, model=model, devices=devices
                                         ).estimate.throughput_seq_s
        except InfeasibleBoundError:
            gain = math.nan
        print(f"{model:<10} {devices:<8} {task:<4} {bound:>8.3g} {what:<40} {got:>7.3f} {gain:>5.2f} {wall:>8.3f} {cands:>6} "
              f"{'-' if ref is None else f'{ref:.3f}':>10} {same:>4}", flush=True)
    print("-" * len(header))
    print(f"find_schedule: median {statistics.median(walls):.3f} s, max {max(walls):.3f} s over {len(walls)} cases; "
          f"exhaustive optimum equal in {agree}/{ran} cases where it ran ({len(small) - ran} past {limit:g} s, "
          f"{len(rows) - len(small)} on clusters over {args.exhaustive_max_devices} devices not run)")

    print(f"\n{'model':<10} {'task':<4} {'smallest s':>10} {'its time s':>10} {'below it: error s':>17}")
    sfb_walls = []
    for model, devices in clusters:
        for task in args.tasks:
            w = Workload.task(task)
            t0 = time.perf_counter()
            smallest = smallest_feasible_bound(w, model=model, devices=devices)
            t_sfb = time.perf_counter() - t0
            t_err, _, named = timed_search(model, devices, task, smallest * 0.99)
            sfb_walls += [t_sfb, t_err]
            print(f"{model:<10} {task:<4} {smallest:>10.4g} {t_sfb:>10.3f} {t_err:>17.3f}"
                  + ("" if named is not None and math.isclose(named, smallest, rel_tol=1e-9) else "  (names another)"),
                  flush=True)
    print(f"smallest bound and the infeasible path: median {statistics.median(sfb_walls):.3f} s, "
          f"max {max(sfb_walls):.3f} s over {len(sfb_walls)} calls")

    if not args.no_forced:
        print("\nBest throughput with each device count forced (seq/s, R RRA / C WAA-C / M WAA-M, '-' infeasible):")
        for model, devices in clusters:
            for split in ("rule", "searched"):
                print(f"{model} {devices} WAA split {split}: {forced_counts(model, devices, split)}", flush=True)


if __name__ == "__main__":
    main()
