"""Search benchmark: the paper's six models on their clusters, five tasks x four bounds.

For each case: the branch-and-bound search over the paper's policies (RRA, WAA-C, WAA-M; wall time, candidates
evaluated), the exhaustive enumeration of the same space (wall time, and whether the search found its optimum), and the
throughput ratio against the FasterTransformer-style static-batching baseline at the same bound.
Bounds follow the paper (§7.1): static batching is run at batch sizes 1, 5, 9, ...; the bounds are
the 10th, 30th and 70th percentiles of its latencies, plus infinity.

  python benchmarks/search.py              # everything (tens of minutes: the exhaustive reference)
  python benchmarks/search.py --quick      # OPT-13B and T5-11B only
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np

from exegpt import InfeasibleBoundError, Workload, exhaustive_schedule, find_schedule, static_schedule
from exegpt.errors import ExeGPTError
from exegpt.policies.static import baseline_layout as static_baseline_layout
from exegpt.problem import problem
from exegpt.policies import describe
from exegpt.policies.static import points as static_points
from exegpt.search.optimize import BOX_POLICIES
from exegpt.workload import TASKS

CLUSTERS = [("t5-11b", "8xA40"), ("opt-13b", "4xA40"), ("gpt3-39b", "16xA40"), ("gpt3-101b", "16xA100"),
            ("gpt3-175b", "16xA100"), ("gpt3-341b", "48xA40")]


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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="only OPT-13B and T5-11B")
    ap.add_argument("--no-exhaustive", action="store_true")
    ap.add_argument("--exhaustive-max-gpus", type=int, default=1 << 30,
                    help="skip the exhaustive reference on larger clusters (it takes minutes per case there)")
    ap.add_argument("--models", nargs="+", help="only these models")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), help="only these tasks")
    args = ap.parse_args()
    clusters = CLUSTERS[:2] if args.quick else CLUSTERS
    if args.models:
        clusters = [c for c in clusters if c[0] in args.models]
    header = (f"{'model':<10} {'devices':<8} {'task':<4} {'bound s':>8} {'best schedule':<42} {'seq/s':>8} "
              f"{'static':>8} {'gain':>6} {'search s':>9} {'cands':>6} {'exh s':>7} {'exh cands':>10} {'opt':>4}")
    print(header)
    print("-" * len(header))
    walls, gains, matches, total = [], [], 0, 0
    for model, devices in clusters:
        for task in args.tasks:
            w = Workload.task(task)
            for bound in static_bounds(w, model, devices):
                total += 1
                try:
                    t0 = time.perf_counter()
                    plan = find_schedule(w, bound, model=model, devices=devices, policies=BOX_POLICIES)
                    wall = time.perf_counter() - t0
                except InfeasibleBoundError:
                    print(f"{model:<10} {devices:<8} {task:<4} {bound:>8.3g} {'infeasible':<42}")
                    continue
                walls.append(wall)
                try:
                    base = static_schedule(w, bound, model=model, devices=devices).estimate.throughput_seq_s
                except InfeasibleBoundError:
                    base = float("nan")
                gain = plan.estimate.throughput_seq_s / base
                if math.isfinite(gain):
                    gains.append(gain)
                exh_wall, exh_cands, ok = float("nan"), 0, "-"
                if not args.no_exhaustive and int(devices.split("x")[0]) <= args.exhaustive_max_gpus:
                    t0 = time.perf_counter()
                    ref = exhaustive_schedule(w, bound, model=model, devices=devices, policies=BOX_POLICIES)
                    exh_wall, exh_cands = time.perf_counter() - t0, ref.search.candidates_evaluated
                    same = math.isclose(ref.estimate.throughput_seq_s, plan.estimate.throughput_seq_s, rel_tol=1e-9)
                    matches += same
                    ok = "yes" if same else "NO"
                print(f"{model:<10} {devices:<8} {task:<4} {bound:>8.3g} {describe(plan.schedule):<42} "
                      f"{plan.estimate.throughput_seq_s:>8.3f} {base:>8.3f} {gain:>6.2f} {wall:>9.3f} "
                      f"{plan.search.candidates_evaluated:>6} {exh_wall:>7.1f} {exh_cands:>10} {ok:>4}", flush=True)
    print("-" * len(header))
    if walls:
        print(f"search wall: median {statistics.median(walls):.3f} s, max {max(walls):.3f} s over {len(walls)} "
              f"feasible cases; gain over static: mean {statistics.mean(gains):.2f}x, "
              f"max {max(gains):.2f}x; exhaustive optimum found in {matches}/{len(walls)} (of {total} cases)")


if __name__ == "__main__":
    main()
