"""Simulator fidelity on this machine: profile -> simulate -> execute -> predicted vs measured.

Plans: RRA and WAA, several B_E / N_D / TP, three workloads including a real trace scaled to CPU-sized lengths,
plus the plans find_schedule picks on one and on two ranks under a bound (twice the smallest any schedule using
all of them meets) with the closed loop's latency margin (the two-rank pick may use one rank). Every plan runs
once per round, rounds interleaved, each round predicted from a profile measured just before it.

Printed:
- one row per plan: the median of its predictions over the rounds against the median of its measurements (the
  row's 'kept' is the median run's), then the mean and worst relative errors, for one and for two ranks;
- where the time went (measured / predicted per cost term; for WAA the time outside all of them);
- the run-to-run spread of the same plan and the noise floor it sets (``noise_floor``: each run predicted by the
  same plan's other runs), and the errors of each round against its own profile;
- the plans run on the simulated engine on the runs' own requests (``exegpt.sim``: the worst latency of the
  bound-length requests, which the steady-state estimate does not see) against the same measurements;
- the machine's drift (``speed_probe`` just before each run over the same probe just after the profile; for a
  plan of several ranks, times the rank slowdown measured just before it over the profile's) and the errors with
  the prediction scaled by it;
- one summary line (unscaled; a pick counts as keeping its bound only when it kept it in every round):

  fidelity: throughput error mean X% worst Y%; latency error mean X% worst Y%; bounds kept N/M

  python -m benchmarks.fidelity [--model tiny] [--requests 800] [--rounds 3] [--cached-profile | --profile P]
                                [--save runs.json] [--plans cb,disagg]

On a GPU machine both the profile and the runs use CUDA (one rank per device, at most two); benchmarks/gpu_check.sh
runs it there on a 1B preset.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
from pathlib import Path

import torch

from exegpt import (InfeasibleBoundError, RRASchedule, StaticSchedule, WAASchedule, Policy, Profile, Workload,
                    evaluate_schedule, find_schedule, smallest_feasible_bound)
from exegpt.policies.cb import CBSchedule
from exegpt.policies.chunked import ChunkedSchedule
from exegpt.policies.disagg import DisaggSchedule
from exegpt.problem import offered_cluster
from exegpt.policies import describe
from exegpt.stages import spans_ranks
from profiler.collectives import run_group
from profiler.device import resolve_device
from profiler.engine import period_over_longer
from profiler.loop import CPU_TASK, CPU_TRACE, LATENCY_MARGIN, THREADS, cached_profile, median_comparison, \
    run_and_compare, speed_probe, table_header, _row

WORKLOADS = {
    "S/4": CPU_TASK,
    "C1/4": Workload.truncated_normal(input=(64, 29, 128), output=(64, 30, 160), name="C1/4"),
    "conv": CPU_TRACE,
}


def runnable_ranks(prof) -> int:
    """Ranks a plan of ``prof``'s device can run on here, at most two: CPU ranks are processes sharing the
    cores; CUDA ranks take a device each."""
    if prof.device == "cpu":
        return 2
    return min(2, torch.cuda.device_count())


def cases(prof, ranks: int = 2):
    """(name, plan) pairs: hand-picked schedules and the ones find_schedule picks, on one rank of ``prof``'s
    device and, with ``ranks`` 2, on two."""
    out = []
    one, two = f"1x{prof.device}", f"2x{prof.device}"

    def add(name, wname, schedule, devices):
        w = WORKLOADS[wname]
        if offered_cluster(devices, prof).count <= ranks:
            out.append((name, evaluate_schedule(schedule, w, math.inf, profile=prof, devices=devices)))

    add("rra-a", "S/4", RRASchedule(4, 4, 1, 0, 1), one)
    add("rra-b", "S/4", RRASchedule(8, 8, 1, 0, 1), one)
    add("rra-c", "S/4", RRASchedule(16, 2, 1, 0, 1), one)
    add("rra-d", "C1/4", RRASchedule(4, 16, 1, 0, 1), one)
    add("rra-e", "C1/4", RRASchedule(8, 4, 1, 0, 1), one)
    add("rra-f", "conv", RRASchedule(8, 8, 1, 0, 1), one)
    add("rra-pp2", "S/4", RRASchedule(8, 4, 1, 0, 2), two)
    add("rra-tp2", "S/4", RRASchedule(8, 4, 2, 2, 2), two)
    add("waa-a", "S/4", WAASchedule(Policy.WAA_C, 2, 16, 1, 0, 1, 1), two)
    add("waa-b", "C1/4", WAASchedule(Policy.WAA_C, 2, 32, 1, 0, 1, 1), two)
    add("waa-c", "conv", WAASchedule(Policy.WAA_M, 4, 64, 1, 0, 1, 1), two)
    add("static-a", "S/4", StaticSchedule(8, 1, 1), one)
    add("cb-a", "S/4", CBSchedule(32, 512, 1, 0, 1), one)
    add("cb-b", "conv", CBSchedule(64, 1024, 1, 0, 1), one)
    add("chunked-a", "S/4", ChunkedSchedule(256, 32, 1, 0, 1), one)
    add("disagg-a", "S/4", DisaggSchedule(32, 512, 1, 1), two)
    add("disagg-b", "conv", DisaggSchedule(64, 1024, 1, 1), two)
    for wname in WORKLOADS:
        for devices in (one, two)[:ranks]:
            w = WORKLOADS[wname]
            # Twice the smallest bound of schedules using all the devices; the pick may use fewer of them.
            n = offered_cluster(devices, prof).count
            bound = 2 * smallest_feasible_bound(w, profile=prof, devices=devices, device_counts=(n,))
            try:
                out.append((f"best-{wname}-{devices[0]}", find_schedule(w, bound, profile=prof, devices=devices,
                                                                       latency_margin=LATENCY_MARGIN)))
            except InfeasibleBoundError:
                continue
    return out


def rank_drift(prof, model: str, plan) -> float:
    """For a plan with a group of stages spanning several ranks (where the simulator applies the profile's rank
    slowdown), the rank slowdown measured now (a group of fresh processes, ~6 s) over the profile's; else 1."""
    ranks = plan.schedule.num_gpus
    groups = {role: tuple(st for st in plan.stages if st.role == role) for role in {st.role for st in plan.stages}}
    if ranks < 2 or not any(spans_ranks(g) for g in groups.values()) or prof.slowdown(ranks) == 1.0:
        return 1.0
    now = run_group(ranks, (64,), allreduce=False, point_to_point=False, quick=True, probe_model=model)
    return now["rank_slowdown"]["factor"] / prof.slowdown(ranks)


def noise_floor(runs_by_plan: list[list[float]]) -> list[float]:
    """The error of predicting each run by the median of the same plan's runs in the other rounds:
    |median(others) - run| / run, for every run of every plan with at least two (NaN runs skipped). No model
    of the machine can expect to do better than this on the same runs; it is the machine's noise, not the
    model's error."""
    out = []
    for runs in runs_by_plan:
        runs = [x for x in runs if math.isfinite(x)]
        for i, x in enumerate(runs):
            others = runs[:i] + runs[i + 1:]
            if others:
                out.append(abs(statistics.median(others) - x) / x)
    return out


def save_rounds(rounds, path: str) -> None:
    """Every round's prediction and measurement per plan (seconds, sequences per second), for later analysis."""
    keys = ("throughput_seq_s", "latency_s", "encode_stage_s", "decode_step_s", "decode_batch")
    out = [{c.name: {"schedule": describe(c.plan.schedule), "bound_s": c.plan.bound.bound_s, "drift": c.drift,
                     "predicted": {k: getattr(c.plan.estimate, k) for k in keys},
                     "measured": {k: getattr(c.report, k) for k in keys} | {"latency_p50_s": c.report.latency_p50_s},
                     "simulated": None if c.simulated is None else {k: getattr(c.simulated, k) for k in keys}}
            for c in runs} for runs in rounds]
    Path(path).write_text(json.dumps(out, indent=1, allow_nan=True))


def _mean_worst(xs) -> str:
    """'mean X% worst Y%' of relative errors or spreads."""
    return f"mean {100 * statistics.mean(xs):.1f}% worst {100 * max(xs):.1f}%"


def _errors(throughput, latency) -> str:
    """'throughput error mean X% worst Y%; latency error mean X% worst Y%' (latencies no request reached, NaN,
    left out)."""
    return (f"throughput error {_mean_worst(throughput)}; "
            f"latency error {_mean_worst([x for x in latency if math.isfinite(x)])}")


def _attribution(c) -> str:
    """One row of measured / predicted per cost term of ``c`` (a Comparison)."""
    e, r, s = c.plan.estimate, c.report, c.plan.schedule

    def ratio(m, p):
        return f"{m / p:.2f}x" if p > 0 and math.isfinite(m) and m > 0 else "-"

    outside = "-"
    if isinstance(s, WAASchedule) and r.throughput_seq_s > 0:
        outside = f"{period_over_longer(s.encode_batch, r):.2f}x"
    arith = c.phase_time_throughput_error
    arith = f"{100 * arith:.1f}%" if math.isfinite(arith) else "-"
    return (f"{c.name:<12} {ratio(r.encode_stage_s, e.encode_stage_s):>7} "
            f"{ratio(r.decode_step_s, e.decode_step_s):>11} {ratio(r.decode_batch, e.decode_batch):>12} {outside:>8} "
            f"{arith:>10}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="preset, folder or smollm2 (default: the --profile's model, else tiny)")
    ap.add_argument("--requests", type=int, default=800)
    source = ap.add_mutually_exclusive_group()
    source.add_argument("--cached-profile", action="store_true",
                        help="reuse the cached profile (default: measure it before each round, under the machine "
                             "load of the runs that follow)")
    source.add_argument("--profile", metavar="PATH",
                        help="predict every round from this Profile JSON (e.g. one `python -m profiler` wrote) "
                             "instead of profiling here")
    ap.add_argument("--rounds", type=int, default=3,
                    help="runs per plan, interleaved, each predicted from a profile taken just before its round; "
                         "the table compares the medians over the rounds of prediction and measurement")
    ap.add_argument("--save", metavar="PATH", help="also write every round's prediction and measurement as JSON")
    ap.add_argument("--plans", metavar="PREFIXES", help="only the plans whose names start with one of these "
                                                         "comma-separated prefixes (e.g. cb,disagg,best)")
    a = ap.parse_args()
    for flag, value in (("--rounds", a.rounds), ("--requests", a.requests)):
        if value < 1:
            ap.error(f"{flag} {value} must be a whole number >= 1")
    fixed = a.cached_profile or a.profile is not None
    if a.profile is not None:
        prof = Profile.load(a.profile)
        spec = prof.provenance.get("spec") or prof.model  # what was loaded: a preset, a folder or smollm2
        if a.model is not None and a.model != spec:
            ap.error(f"--profile {a.profile} was measured for {spec!r}, not for --model {a.model!r}")
        a.model = spec
        here = resolve_device(None).type  # where runner.run_plans executes one-rank plans and the profiler measures
        if (prof.device == "cpu") != (here == "cpu"):
            ap.error(f"--profile {a.profile} was measured on {prof.device!r}; the runs execute on {here} here")
        threads = prof.provenance.get("torch_threads")
        if here == "cpu" and threads != THREADS:
            ap.error(f"--profile {a.profile} was measured with {threads} torch threads; the runs use {THREADS} "
                     f"(python -m profiler --threads {THREADS})")
    else:
        a.model = a.model or "tiny"
        prof = cached_profile(a.model, refresh=not a.cached_profile)
    # The machine-speed probes time the CPU path: a shared VM's drift, which a GPU does not have.
    probing = prof.device == "cpu"
    probe0 = speed_probe(a.model) if probing else 1.0
    named = cases(prof, runnable_ranks(prof))
    if a.plans:
        prefixes = tuple(x.strip() for x in a.plans.split(",") if x.strip())
        named = [(n, p) for n, p in named if n.startswith(prefixes)]
        if not named:
            ap.error(f"--plans {a.plans!r} names none of the plans; they are {', '.join(n for n, _ in cases(prof))}")
    rounds = []
    for r in range(a.rounds):  # a shared VM's speed drifts by tens of percent within minutes: interleave rounds
        if r > 0 and not fixed:
            # Each round predicts from a profile taken just before it (profile -> simulate -> run, as a user
            # does): the same schedules, re-estimated; the plans were chosen on the first profile.
            prof = cached_profile(a.model, refresh=True)
            probe0 = speed_probe(a.model) if probing else 1.0
            named = [(n, evaluate_schedule(p.schedule, p.workload, p.bound, profile=prof, devices=p.devices))
                     for n, p in named]
        rows = []
        for name, plan in named:  # the same requests for every plan of a workload (same seed and trace)
            w = plan.workload
            drift = speed_probe(a.model) / probe0 * rank_drift(prof, a.model, plan) if probing else 1.0
            c = run_and_compare([(name, plan)], a.model, num_requests=a.requests,
                                trace=w if w.pairs is not None else None, profile=prof)[0]
            rows.append(dataclasses.replace(c, drift=drift))
            # As it goes (stderr), so that a run cut short still shows what it measured.
            print(f"round {r + 1}/{a.rounds} {name:<12} {describe(plan.schedule):<34} seq/s predicted "
                  f"{plan.estimate.throughput_seq_s:.1f} measured {c.report.throughput_seq_s:.1f}; latency "
                  f"predicted {plan.estimate.latency_s:.3f} measured {c.report.latency_s:.3f}", file=sys.stderr,
                  flush=True)
        rounds.append(rows)
    if a.save:
        save_rounds(rounds, a.save)
    rows, spreads, pred_spreads = [], [], []
    for runs in zip(*rounds):
        rows.append(median_comparison(list(runs)))
        for out, xs in ((spreads, [c.report.throughput_seq_s for c in runs]),
                        (pred_spreads, [c.plan.estimate.throughput_seq_s for c in runs])):
            out.append((max(xs) - min(xs)) / statistics.median(xs))
    print(f"profile {prof.id}: {prof.provenance.get('date', '?')}, torch {prof.provenance.get('torch_version', '?')}"
          f"{'' if fixed else ', measured afresh before each round'}")
    print(table_header() + "  spread  drift  err/drift")
    for c, spread in zip(rows, spreads):
        print(_row(c) + f"  {100 * spread:5.1f}%  {c.drift:5.2f}  {100 * c.drift_throughput_error:8.1f}%")
    for label, group in (("one rank", [c for c in rows if c.plan.schedule.num_gpus == 1]),
                         ("two ranks", [c for c in rows if c.plan.schedule.num_gpus > 1])):
        if group:
            print(f"  {label}: {_errors([c.throughput_error for c in group], [c.latency_error for c in group])}")
    print("  where the time went (measured / predicted; for WAA, 'outside' is the measured time per merged batch,\n"
          "  B_E / throughput, over the longer of its measured encode stage and decode iteration: > 1 is time in\n"
          "  neither, i.e. the decode driver's compaction, merge and waits)")
    print("  'arithmetic': the throughput error left when the prediction is rescaled to the run's own phase times")
    print(f"  {'plan':<12} {'encode':>7} {'decode step':>11} {'decode batch':>12} {'outside':>8} {'arithmetic':>10}")
    for c in rows:
        print("  " + _attribution(c))
    phase = [c.phase_time_throughput_error for c in rows if math.isfinite(c.phase_time_throughput_error)]
    if phase:
        print(f"  the schedule's arithmetic alone (each plan's prediction rescaled to its runs' own encode and decode "
              f"phase times): throughput error {_mean_worst(phase)}; the rest of the error is what each phase cost")
    print(f"  run-to-run throughput spread of the same plan ((max - min) / median over {a.rounds} rounds): "
          f"{_mean_worst(spreads)}; of its prediction from each round's profile: {_mean_worst(pred_spreads)}")
    picks = [runs for runs in zip(*rounds) if runs[0].name.startswith("best")]
    kept_every_round = sum(all(c.bound_kept is True for c in runs) for runs in picks)
    paired = [c for runs in rounds for c in runs]
    print(f"  each round against its own profile (not medians): "
          f"{_errors([c.throughput_error for c in paired], [c.latency_error for c in paired])}")
    floor_t = noise_floor([[c.report.throughput_seq_s for c in runs] for runs in zip(*rounds)])
    floor_l = noise_floor([[c.report.latency_s for c in runs] for runs in zip(*rounds)])
    if floor_t:
        print(f"  noise floor (each run predicted by the median of the same plan's runs in the other rounds): "
              f"{_errors(floor_t, floor_l)}")
    # The measured latency is the worst among the requests that reached latency_len tokens (what a bound must
    # hold), the prediction that length's expected latency: their median shows how much of the gap is spread.
    med = [c.latency_p50_error for c in rows if math.isfinite(c.latency_p50_error)]
    if med:
        print(f"  latency against the median (not the worst) of the same requests: error {_mean_worst(med)}")
    replayed = [c for c in rows if c.simulated is not None]
    if replayed:
        print("  on the simulated engine (exegpt.sim: the runner's drivers on the run's own requests, every "
              "step costed by the profile)")
        print(f"  {'plan':<12} {'sim seq/s':>12} {'err':>6} {'est err':>7} {'sim lat':>10} {'err':>6} "
              f"{'est err':>7} {'p50':>7}")
        for c in replayed:
            rp = c.simulated
            print(f"  {c.name:<12} {rp.throughput_seq_s:>12.1f} {100 * c.simulated_throughput_error:>5.1f}% "
                  f"{100 * c.throughput_error:>6.1f}% {rp.latency_s:>10.3f} {100 * c.simulated_latency_error:>5.1f}% "
                  f"{100 * c.latency_error:>6.1f}% {rp.latency_p50_s:>7.3f}")
        for label, f_thr, f_lat in (("estimate", "throughput_error", "latency_error"),
                                    ("simulated", "simulated_throughput_error", "simulated_latency_error")):
            print(f"  simulated runs, {label}: "
                  f"{_errors([getattr(c, f_thr) for c in replayed], [getattr(c, f_lat) for c in replayed])}")
    if probing:
        drifts = [c.drift for c in rows]
        d_lat = [c.drift_latency_error for c in rows if math.isfinite(c.drift_latency_error)]
        print(f"  machine drift between profile and run (probe seconds before the run / after the profile): "
              f"{min(drifts):.2f}-{max(drifts):.2f}; errors with the prediction scaled by it: throughput "
              f"{_mean_worst([c.drift_throughput_error for c in rows])}, latency {_mean_worst(d_lat)}")
    print(f"fidelity: {_errors([c.throughput_error for c in rows], [c.latency_error for c in rows])}; "
          f"bounds kept {kept_every_round}/{len(picks)}")


if __name__ == "__main__":
    main()
