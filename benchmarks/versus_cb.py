"""End to end on the runner: ExeGPT's pick against continuous batching tuned for the same bound, on the same
requests.

    python -m benchmarks.versus_cb [--model tiny] [--requests 400] [--rounds 3] [--cached-profile]

For each workload and rank count: the bound is twice the smallest any schedule using all the ranks meets; either
side may use fewer ranks. Both sides are chosen the same way, by ``find_schedule`` at that bound with the closed loop's latency margin and its
pick verified on the simulated engine (``verify_requests``: the worst simulated bound-length request must keep
the bound): ExeGPT's pick among RRA and WAA, continuous batching's best over its knob grid (``max_num_seqs`` 1 to
256, ``max_num_batched_tokens`` one and four longest requests, every TP layout), as a serving engine's operator
would tune it for the bound. Both plans then run on the runner on the same requests, in interleaved rounds (the
machine's speed drifts between minutes); the table gives the medians over the rounds, the ratio of ExeGPT's
throughput over continuous batching's in each round, and whether each kept the bound in every round.
"""

from __future__ import annotations

import argparse
import statistics

from exegpt import InfeasibleBoundError, find_schedule, smallest_feasible_bound
from exegpt.policies import describe
from exegpt.problem import offered_cluster
from profiler.loop import CPU_TASK, CPU_TRACE, LATENCY_MARGIN, cached_profile, run_and_compare

SETTINGS = (("S/4", CPU_TASK, 1), ("conv", CPU_TRACE, 1), ("S/4", CPU_TASK, 2))
SIDES = (("exegpt", ("rra", "waa_c", "waa_m")), ("cb", ("cb",)))


def plans(prof, verify: int):
    """(setting, bound, {side: plan}) for every setting whose ranks this profile's device offers."""
    out = []
    for name, w, ranks in SETTINGS:
        devices = f"{ranks}x{prof.device}"
        if offered_cluster(devices, prof).count < ranks:
            continue
        bound = 2 * smallest_feasible_bound(w, profile=prof, devices=devices, device_counts=(ranks,))
        picked = {}
        for side, policies in SIDES:
            try:
                picked[side] = find_schedule(w, bound, profile=prof, devices=devices, policies=policies,
                                             latency_margin=LATENCY_MARGIN, verify_requests=verify)
                # Either side may leave ranks idle (device_counts=None): on CPU ranks a pipeline's messages can
                # cost more than a second rank adds.
            except InfeasibleBoundError as e:
                print(f"{name} on {ranks} rank(s), {side}: {e}")
        if len(picked) == len(SIDES):
            out.append((f"{name}/{ranks}r", bound, picked))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cached-profile", action="store_true", help="reuse the cached profile of --model")
    a = ap.parse_args(argv)
    for flag, value in (("--rounds", a.rounds), ("--requests", a.requests)):
        if value < 1:
            ap.error(f"{flag} {value} must be a whole number >= 1")
    prof = cached_profile(a.model, refresh=not a.cached_profile)
    cases = plans(prof, a.requests)
    runs = {(c, side): [] for c, _, _ in cases for side, _ in SIDES}
    for r in range(a.rounds):  # interleaved: each round runs every plan once, on the same requests per workload
        for c, _, picked in cases:
            for side, _ in SIDES:
                plan = picked[side]
                w = plan.workload
                comp = run_and_compare([(side, plan)], a.model, num_requests=a.requests,
                                       trace=w if w.pairs is not None else None, profile=prof)[0]
                runs[c, side].append(comp.report)
    print(f"profile {prof.id}; {a.requests} requests per run, {a.rounds} interleaved rounds; medians")
    print(f"{'setting':<10} {'bound s':>8} {'side':<7} {'schedule':<36} {'seq/s':>8} {'lat s':>7} {'kept':>5} "
          f"{'ExeGPT/CB per round':>22}")
    for c, bound, picked in cases:
        ratios = [a.throughput_seq_s / b.throughput_seq_s for a, b in zip(runs[c, "exegpt"], runs[c, "cb"])]
        for side, _ in SIDES:
            reps = runs[c, side]
            kept = all(rep.latency_s <= bound for rep in reps)
            tail = " ".join(f"{x:.2f}" for x in ratios) if side == "exegpt" else ""
            print(f"{c:<10} {bound:>8.3f} {side:<7} {describe(picked[side].schedule):<36} "
                  f"{statistics.median(rep.throughput_seq_s for rep in reps):>8.1f} "
                  f"{statistics.median(rep.latency_s for rep in reps):>7.3f} {'yes' if kept else 'NO':>5} "
                  f"{tail:>22}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
