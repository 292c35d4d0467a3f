"""The closed loop: profile the runner on this machine, plan with exegpt, run the plan, compare.

``exegpt-demo`` (``python -m profiler.loop``) is the project's main job on built-in defaults:

1. plans the paper's OPT-13B on 4xA40 for its five tasks from the shipped GPU measurements;
2. profiles the ``tiny`` preset on this machine (cached under ``~/.cache/exegpt``), finds the best
   schedule for a built-in workload (``DEMO_TASK``) under a latency bound, runs it on the built-in backend in
   turn with the best static-batching baseline at the same bound (three rounds), and prints predicted vs
   measured (medians) and the gain.

Runs are timed with one intra-op thread per rank, as the profile is, so that the two compare.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from exegpt import InfeasibleBoundError, Plan, Profile, RRASchedule, WAASchedule, Workload, find_schedule, \
    static_schedule
from exegpt.errors import ExeGPTError
from exegpt.sim import run_simulated
from exegpt.arrivals import sample_lengths
from exegpt.policies import describe
from runner import cpu_kernels
from exegpt.report import RunReport
from runner.run import run_plans

log = logging.getLogger(__name__)

CACHE_DIR = Path(os.environ.get("EXEGPT_CACHE", Path.home() / ".cache" / "exegpt"))
THREADS = 1
"""Intra-op threads of every profiled and executed rank (a parallel region on a shared CPU mostly times
the scheduler; one thread per rank keeps profile and run comparable)."""

LATENCY_MARGIN = 0.3
"""Plans of the closed loop keep this margin below their bound (``find_schedule(latency_margin=...)``):
benchmarks/fidelity.py measured the simulator's single-rank latency error on this CPU at up to 32 % low, so
a plan at 70 % of its bound keeps the bound when run."""

# A CPU-sized workload shaped like the paper's summarization task S (Table 3), lengths / 4 for the input.
CPU_TASK = Workload.truncated_normal(input=(64, 63, 128), output=(32, 13, 80), name="S/4")
# The shipped Azure conversation trace, prompts x0.02 and outputs x0.2: CPU-sized, same shape and correlation.
CPU_TRACE = Workload.trace("azure_conv").scaled(0.02, 0.2, name="azure_conv scaled")
DEMO_TASK = CPU_TRACE
"""The demo's workload: real requests, whose outputs vary widely, so static batching pads each batch to its
longest output (its predicted gain at the demo's bound: 2.0x on this task, 1.15x on S/4, measured on 2 Xeon
cores; enough to stand out of the machine's noise)."""


@dataclass(frozen=True)
class Comparison:
    """Predicted (plan.estimate) vs measured (report) for one plan."""

    name: str
    plan: Plan
    report: RunReport
    drift: float = 1.0
    """The machine's speed when the plan ran against when it was profiled: ``speed_probe`` seconds just before
    the run over the same probe just after profiling (1.2: everything 20 % slower). 1 when not probed."""
    simulated: RunReport | None = None
    """The plan run on the simulated engine (``exegpt.sim``) on the run's own requests, or None."""

    @property
    def simulated_throughput_error(self) -> float:
        """|simulated - measured| / measured sequences per second (NaN without a simulated run)."""
        if self.simulated is None:
            return math.nan
        return abs(self.simulated.throughput_seq_s - self.report.throughput_seq_s) / self.report.throughput_seq_s

    @property
    def simulated_latency_error(self) -> float:
        """|simulated - measured| / measured worst latency to the bound length (NaN without a simulated run)."""
        if self.simulated is None:
            return math.nan
        return abs(self.simulated.latency_s - self.report.latency_s) / self.report.latency_s

    @property
    def throughput_error(self) -> float:
        """|predicted - measured| / measured sequences per second."""
        return abs(self.plan.estimate.throughput_seq_s - self.report.throughput_seq_s) / self.report.throughput_seq_s

    @property
    def drift_throughput_error(self) -> float:
        """``throughput_error`` with the prediction's seconds scaled by ``drift``: the model's error apart from
        the machine's change of speed between profile and run (every cost taken to scale alike)."""
        pred = self.plan.estimate.throughput_seq_s / self.drift
        return abs(pred - self.report.throughput_seq_s) / self.report.throughput_seq_s

    @property
    def drift_latency_error(self) -> float:
        """``latency_error`` with the predicted latency scaled by ``drift``."""
        return abs(self.plan.estimate.latency_s * self.drift - self.report.latency_s) / self.report.latency_s

    @property
    def phase_time_throughput_error(self) -> float:
        """``throughput_error`` with the prediction rescaled to the run's own phase times: the predicted throughput
        times the predicted period over the period the measured encode stage and decode step make (RRA: an
        encode stage and N_D decode steps; WAA: the longer of the two groups' batches). What is left is the
        schedule's arithmetic, the sequences a period completes, apart from what each phase costs. NaN for
        other schedules or an unmeasured phase."""
        e, r, s = self.plan.estimate, self.report, self.plan.schedule
        if isinstance(s, RRASchedule):
            pred = e.encode_stage_s + s.decode_iters * e.decode_step_s
            meas = r.encode_stage_s + s.decode_iters * r.decode_step_s
        elif isinstance(s, WAASchedule):
            pred, meas = max(e.encode_stage_s, e.decode_step_s), max(r.encode_stage_s, r.decode_step_s)
        else:
            return math.nan
        return abs(e.throughput_seq_s * pred / meas - r.throughput_seq_s) / r.throughput_seq_s

    @property
    def latency_error(self) -> float:
        """|predicted - measured| / measured latency of the bound-length output."""
        return abs(self.plan.estimate.latency_s - self.report.latency_s) / self.report.latency_s

    @property
    def latency_p50_error(self) -> float:
        """|predicted - measured| / measured against the median, not the worst, of the same requests' latencies
        (NaN when none reached ``latency_len`` tokens)."""
        return abs(self.plan.estimate.latency_s - self.report.latency_p50_s) / self.report.latency_p50_s

    @property
    def bound_kept(self) -> bool | None:
        """Whether the measured latency kept the bound; None when no request was long enough to measure it."""
        if math.isnan(self.report.latency_s):
            return None
        return self.report.latency_s <= self.plan.bound.bound_s


def median_comparison(rounds: list[Comparison]) -> Comparison:
    """One plan run in several rounds (each predicted from one profile, or from a profile taken just before it): a
    Comparison whose estimate, report, simulated run and drift carry the median over the rounds of every float field
    (integer fields and the rest from the first round). On a shared machine both a profile and a run move by
    tens of percent from minute to minute; the medians compare the model's expected cost with the expected
    measurement, where one round pairs two draws of that noise."""
    if not rounds or len({c.plan.schedule for c in rounds}) != 1:
        raise ValueError(f"median_comparison needs rounds of one schedule, got "
                         f"{sorted({describe(c.plan.schedule) for c in rounds})}")

    def med(objs):
        over = {f.name: _median([getattr(o, f.name) for o in objs])
                for f in dataclasses.fields(objs[0]) if f.type in ("float", float)}
        return dataclasses.replace(objs[0], **over)

    first = rounds[0]
    replays = [c.simulated for c in rounds]
    return dataclasses.replace(
        first, plan=dataclasses.replace(first.plan, estimate=med([c.plan.estimate for c in rounds])),
        report=med([c.report for c in rounds]), drift=_median([c.drift for c in rounds]),
        simulated=med(replays) if all(r is not None for r in replays) else None)


def _median(xs: list[float]) -> float:
    """Median of the values that are not NaN (a round where no request reached the bound length has a NaN
    latency)."""
    known = [x for x in xs if not math.isnan(x)]
    return statistics.median(known) if known else math.nan


def cached_profile(model: str = "tiny", tp_degrees=(1, 2), quick: bool = True, refresh: bool = False,
                   progress: bool = True, device: str | None = None, budget_s: float | None = -1.0) -> Profile:
    """The profile of ``model`` on ``device`` (default: CUDA when present, else the CPU, where ``run_and_compare``
    runs): loaded from the cache when the same model, TP degrees, grid, budget, torch version, device, thread count
    and profiler method (``METHOD_VERSION``) were profiled before, else measured and cached. ``budget_s``: the
    sweep's time budget (default -1: ``profiler.budget.DEFAULT_BUDGET_S`` of the device; None: the whole grid)."""
    from .budget import DEFAULT_BUDGET_S
    from .device import describe_device
    from .sweep import METHOD_VERSION, profile_model

    dev = describe_device(device)
    if budget_s is not None and budget_s < 0:
        budget_s = DEFAULT_BUDGET_S.get(dev.kind, DEFAULT_BUDGET_S["cpu"])
    key = json.dumps([model, list(tp_degrees), quick, torch.__version__, dev.model, THREADS, platform.node(),
                      METHOD_VERSION, cpu_kernels.config()] + ([] if budget_s is None else [budget_s]))
    path = CACHE_DIR / f"profile-{model}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.json"
    if path.is_file() and not refresh:
        try:
            return Profile.load(path)
        except ExeGPTError:
            log.warning("ignoring unreadable cached profile %s", path)
    prof = profile_model(model, tp_degrees=tuple(tp_degrees), quick=quick, device=device, progress=progress,
                         threads=THREADS, budget_s=budget_s)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        prof.save(path)
    except (OSError, ExeGPTError) as e:
        log.warning("could not cache the profile at %s: %s", path, e)
    return prof


def speed_probe(model: str = "tiny", repeat: int = 60) -> float:
    """Seconds of a fixed piece of the runner's decode work on one thread (``profiler.layer.probe_regions``:
    medians, interleaved), to tell the machine's speed now from its speed when a profile was taken. About a tenth
    of a second on ``tiny``."""
    from .layer import probe_regions
    from .timer import time_interleaved

    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        regions = [r for r, _ in probe_regions(model)]
        return sum(s.median_s for s in time_interleaved(regions, warmup=20, repeat=repeat))
    finally:
        torch.set_num_threads(before)


def run_and_compare(named_plans: list[tuple[str, Plan]], model: str = "tiny", num_requests: int = 600,
                    seed: int = 0, trace: Workload | None = None, progress: bool = False,
                    profile: Profile | None = None, dtype: str | None = None) -> list[Comparison]:
    """Executes each plan on ``model`` (same requests for all) and pairs its estimate with what it measured; with
    the ``profile`` the plans were estimated from, each plan is also run on the simulated engine on the same
    requests. ``dtype``:
    the weights' precision, by default the profile's (so that what runs is what was timed), else fp32."""
    if dtype is None:
        dtype = profile.dtype if profile is not None else "fp32"
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)  # single-rank runs execute in this process
    try:
        reports = run_plans([p for _, p in named_plans], model, num_requests=num_requests, seed=seed, trace=trace,
                            dtype=dtype, progress=progress)
    finally:
        torch.set_num_threads(before)
    out = []
    for (name, plan), rep in zip(named_plans, reports):
        rp = None
        if profile is not None:
            lengths = sample_lengths(trace if trace is not None else plan.workload, num_requests, seed)[1]
            rp = run_simulated(plan, profile, lengths=lengths)
        out.append(Comparison(name, plan, rep, simulated=rp))
    return out


def demo_bound(w: Workload, profile: Profile, devices: str) -> float:
    """A bound both ExeGPT and static batching can meet: twice the fastest static latency."""
    try:
        static_schedule(w, 1e-9, profile=profile, devices=devices)
    except InfeasibleBoundError as e:
        return 2 * e.smallest_feasible_s
    raise AssertionError("unreachable: no schedule generates in 1 ns")


def _row(c: Comparison) -> str:
    e, r = c.plan.estimate, c.report
    unseen = math.isnan(r.latency_s)  # no request of the sample generated latency_len tokens
    lat = f"{'-':>8} {'-':>7}" if unseen else f"{r.latency_s:>8.3f} {100 * c.latency_error:>6.1f}%"
    return (f"  {c.name:<10} {describe(c.plan.schedule):<34} {e.throughput_seq_s:>9.1f} {r.throughput_seq_s:>9.1f} "
            f"{100 * c.throughput_error:>6.1f}% {e.latency_s:>8.3f} {lat} "
            f"{ {True: 'yes', False: 'NO', None: 'n/a'}[c.bound_kept]:>5}"
            + (f"  (no request reached {r.latency_len} tokens)" if unseen else ""))


def table_header() -> str:
    return (f"  {'plan':<10} {'schedule':<34} {'pred seq/s':>9} {'meas':>9} {'err':>7} {'pred lat':>8} "
            f"{'meas':>8} {'err':>7} {'kept':>5}")


def demo(model: str = "tiny", devices: str | None = None, num_requests: int = 600, out=sys.stdout,
         rounds: int = 3) -> list[Comparison]:
    """The main job on built-in defaults (see the module docstring). Returns the closed-loop comparisons, each the
    median over ``rounds`` runs of its plan (``median_comparison``)."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ExeGPTError(f"rounds={rounds!r} must be a whole number >= 1")
    t_start = time.perf_counter()
    print("ExeGPT demo", file=out)
    print("\n1. Plan: the paper's OPT-13B on 4xA40 (shipped A40 measurements), bound 5.9 s on the p99-length "
          "output", file=out)
    print(f"  {'task':<5} {'best schedule':<48} {'seq/s':>8} {'latency':>8} {'static':>8} {'gain':>6} {'search':>8}",
          file=out)
    for task in ("S", "T", "G", "C1", "C2"):
        w = Workload.task(task)
        try:
            plan = find_schedule(w, 5.9)
        except InfeasibleBoundError as e:
            print(f"  {task:<5} infeasible: the smallest feasible bound is {e.smallest_feasible_s:.2f} s", file=out)
            continue
        try:
            base = static_schedule(w, 5.9).estimate.throughput_seq_s
            gain = f"{plan.estimate.throughput_seq_s / base:>5.2f}x"
        except InfeasibleBoundError:
            base, gain = math.nan, "  n/a"
        s = plan.schedule
        desc = describe(s)
        print(f"  {task:<5} {desc:<48} {plan.estimate.throughput_seq_s:>8.2f} {plan.estimate.latency_s:>8.2f} "
              f"{base:>8.2f} {gain:>6} {plan.search.wall_s:>7.2f}s", file=out)

    print(f"\n2. Closed loop on this machine: profile '{model}' -> plan -> run -> compare", file=out)
    t = time.perf_counter()
    prof = cached_profile(model)
    print(f"  profile: {prof.id}, {len(prof.tables)} tables, TP {prof.tp_degrees()} "
          f"({time.perf_counter() - t:.1f} s, cached in {CACHE_DIR})", file=out)
    w = DEMO_TASK
    bound = demo_bound(w, prof, devices)
    plan = find_schedule(w, bound, profile=prof, devices=devices, latency_margin=LATENCY_MARGIN)
    base = static_schedule(w, bound, profile=prof, devices=devices)
    print(f"  workload {w.name}: input {w.input_len}, output {w.output_len}", file=out)
    print(f"  bound {bound:.3f} s on the p99-length output ({plan.estimate.latency_len} tokens), planned with a "
          f"{LATENCY_MARGIN:.0%} margin; "
          f"static batching's bound applies to its longest output ({base.estimate.latency_len} tokens)", file=out)
    # Both plans run in turn, `rounds` times: on a shared machine one run of a plan moves by tens of percent from
    # minute to minute, so the gain is the median of the rounds' ratios between runs seconds apart.
    by_round = [run_and_compare([("exegpt", plan), ("static", base)], model, num_requests=num_requests,
                                profile=prof, trace=w if w.pairs is not None else None) for _ in range(rounds)]
    cmp = [median_comparison(list(runs)) for runs in zip(*by_round)]
    print(f"  medians over {rounds} rounds, the two plans run in turn in each", file=out)
    print(table_header(), file=out)
    for c in cmp:
        print(_row(c), file=out)
    ours, theirs = cmp
    if ours.simulated is not None:
        rp = ours.simulated
        lat = (f"no request reached {rp.latency_len} tokens" if math.isnan(rp.latency_s) else
               f"worst latency {rp.latency_s:.3f} s ({100 * ours.simulated_latency_error:.1f}%), median "
               f"{rp.latency_p50_s:.3f} s")
        print(f"  on the simulated engine, same requests (exegpt.sim): {rp.throughput_seq_s:.1f} seq/s "
              f"({100 * ours.simulated_throughput_error:.1f}% from measured), {lat}", file=out)
    gains = [a.report.throughput_seq_s / b.report.throughput_seq_s for a, b in by_round]
    print(f"  measured gain over static batching at the same bound: {statistics.median(gains):.2f}x "
          f"(rounds {', '.join(f'{g:.2f}x' for g in gains)}; predicted "
          f"{ours.plan.estimate.throughput_seq_s / theirs.plan.estimate.throughput_seq_s:.2f}x)", file=out)
    print(f"\ndone in {time.perf_counter() - t_start:.0f} s", file=out)
    return cmp


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="exegpt-demo", description="Plan the paper's setting, then profile -> "
                                 "plan -> run -> compare on this machine.")
    ap.add_argument("--model", default="tiny", help="preset for the closed loop (default tiny)")
    ap.add_argument("--devices", help="ranks of the closed loop, e.g. 1xcpu or 2xcpu (default: one of the "
                                      "profiled device, the GPU where CUDA is present)")
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--rounds", type=int, default=3, help="runs of each plan, in turn (default 3; the medians count)")
    a = ap.parse_args(argv)
    try:
        demo(a.model, a.devices, a.requests, rounds=a.rounds)
    except ExeGPTError as e:
        print(f"exegpt-demo: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
