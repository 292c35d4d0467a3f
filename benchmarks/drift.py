"""Workload drift: the mean output length shifts by +15 % or -30 % halfway through a run (the paper's §7.6 cases);
detection delay, throughput and bound-keeping before, during and after the shift, with and without re-planning.

    python -m benchmarks.drift [--requests 3000] [--cpu-requests 800] [--rounds 3] [--skip-cpu] [--skip-gpu]

Each run serves ``n`` requests all at once: the first half drawn from the plan's workload, the second half with every
output length times the factor (``exegpt.replan.rescaled``, within the plan's longest output). Both runs of a pair
serve the same requests and watch them with the same monitor (``exegpt.drift``, its defaults: window 128, 32
requests at least, a test every 8, alpha 0.01); one applies the cheap move (``exegpt.replan``), the other keeps its
plan. Segments, by admission: before (the first half), during (from the shift to the move), after (from the move,
the same requests in both runs). Throughput: completions per second between a segment's 10 % and 90 % completion
times. Latency: the worst time from encode start to a request's own bound length (the p99 output length of the
distribution it came from) over the bound; above 1 breaks it.

Settings: simulated (``exegpt.sim``) on the shipped GPU data, OPT-13B on 4xA40 under 1.5x the smallest bound RRA
(task S) or WAA-C (task C1) meets, planned and re-planned with a 15 % latency margin; simulated and executed (``runner``, one CPU rank) with the ``tiny`` preset and
its shipped CPU profile (``tests/data/tiny-cpu.json``), the tests' workload and plan (re-planned with a 3 % margin).
Executed runs repeat
``--rounds`` times, the two runs of a pair interleaved; cells are medians, and the noise floor is the spread of the
'before' throughput, the same requests under the same plan in every run.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from exegpt import Profile, RRASchedule, Workload, evaluate_schedule, find_schedule, run_simulated, \
    smallest_feasible_bound
from exegpt.drift import DriftMonitor, MonitorOptions, segment
from exegpt.replan import DriftOptions, rescaled

SHIFTS = (1.15, 0.7)
TINY_PROFILE = Path(__file__).resolve().parents[1] / "tests" / "data" / "tiny-cpu.json"
TINY_WORKLOAD = Workload.truncated_normal(input=(24, 8, 48), output=(32, 4, 64), name="tiny")
GPU_MARGIN = 0.15
"""The simulated engine's worst bound-length latency ran 14 % past the estimate's on task S (RRA, OPT-13B)."""
TINY_MARGIN = 0.03


@dataclass(frozen=True)
class Setting:
    name: str
    plan: object
    profile: Profile | None
    engine: str
    """'simulated' or 'runner'."""
    margin: float
    """The latency margin of the plan and of its re-plans (``find_schedule(latency_margin=...)``)."""


def settings(gpu: bool, cpu: bool) -> list[Setting]:
    out = []
    if gpu:
        for task, policy in (("S", "rra"), ("C1", "waa_c")):
            w = Workload.task(task)
            bound = 1.5 * smallest_feasible_bound(w, policies=[policy])
            plan = find_schedule(w, bound, policies=[policy], latency_margin=GPU_MARGIN)
            out.append(Setting(f"OPT-13B 4xA40 {task}", plan, None, "simulated", GPU_MARGIN))
    prof = Profile.load(TINY_PROFILE)
    plan = evaluate_schedule(RRASchedule(36, 41, 1, 0, 1), TINY_WORKLOAD, 0.0681, profile=prof, devices="1xcpu")
    out.append(Setting("tiny 1xcpu", plan, prof, "simulated", TINY_MARGIN))
    if cpu:
        out.append(Setting("tiny 1xcpu", plan, prof, "runner", TINY_MARGIN))
    return out


def drifting(w: Workload, factor: float, n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``n`` requests, the second half's outputs times ``factor``; each one's bound length."""
    rng = np.random.default_rng(seed)
    w2 = Workload(w.input_len, rescaled(w.output_len, factor, w.output_len.max))
    h = n // 2
    pairs = np.concatenate([w.sample(h, rng, joint=False), w2.sample(n - h, rng, joint=False)])
    return pairs, np.repeat([w.output_len.quantile(0.99), w2.output_len.quantile(0.99)], [h, n - h])


def run(s: Setting, pairs: np.ndarray, lens: np.ndarray, replan: bool):
    opts = DriftOptions(profile=s.profile, replan=replan, full_replan=replan, latency_margin=s.margin)
    if s.engine == "simulated":
        return run_simulated(s.plan, s.profile, lengths=pairs, latency_lens=lens, drift=opts)
    import torch

    from runner.requests import requests_from_pairs
    from runner.run import run_plan

    torch.set_num_threads(1)
    return run_plan(s.plan, "tiny", requests=requests_from_pairs(pairs, 256), drift=opts, latency_lens=tuple(lens))


def measure(reps: dict, n: int, bound_s: float) -> dict:
    """The numbers of one pair of runs (with and without re-planning)."""
    h = n // 2
    drift = [e for e in reps[True].drift if e.kind == "drift"]
    out = {"lost": {k: n - r.num_finished for k, r in reps.items()}, "alarms": len(drift)}
    if not drift:
        return out
    e = drift[0]
    t_shift = min(r.encode_start_s for r in reps[True].requests if r.id >= h)
    at = e.applied_s if math.isfinite(e.applied_s) else e.detected_s  # a move not taken: from the alarm on
    split = min([r.id for r in reps[True].requests if at <= r.encode_start_s] or [n])
    out.update(read=e.observed - h, delay_s=e.detected_s - t_shift, move=e, split=split)
    for k, rep in reps.items():
        for name, ids in (("before", range(h)), ("during", range(h, split)), ("after", range(split, n))):
            seg = segment(rep.requests, ids)
            out[(k, name)] = (seg.throughput_seq_s, seg.latency_s / bound_s)
    return out


def fmt(x: float, digits: int = 3) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.{digits}g}"


def table(gpu: bool, cpu: bool, n_gpu: int, n_cpu: int, rounds: int) -> str:
    head = ("| setting | shift | re-plan | detected after (requests / s) | seq/s before / during / after | "
            "worst latency / bound before / during / after | move (ms) | full re-plan (gain, s) |")
    lines = [head, "|" + "---|" * 8]
    noise = []
    for s in settings(gpu, cpu):
        n = n_gpu if s.profile is None else n_cpu
        label = f"{s.name} {s.engine}: {describe(s.plan)}"
        control = run(s, *drifting(s.plan.workload, 1.0, n), replan=True)
        lines.append(f"| {label} | none | yes | {len(control.drift)} alarms | {fmt(control.throughput_seq_s)} "
                     f"| | | |")
        for factor in SHIFTS:
            pairs, lens = drifting(s.plan.workload, factor, n)
            results = [measure({k: run(s, pairs, lens, k) for k in (False, True)}, n, s.plan.bound.bound_s)
                       for _ in range(rounds if s.engine == "runner" else 1)]
            m = results[0]
            if "move" not in m:
                lines.append(f"| {label} | {factor - 1:+.0%} | | not detected | | | | |")
                continue
            if s.engine == "runner":
                noise += [r[(k, "before")][0] for r in results for k in (False, True)]
            e = m["move"]
            for k in (False, True):
                cells = [[np.median([r[(k, seg)][i] for r in results]) for seg in ("before", "during", "after")]
                         for i in (0, 1)]
                full = f"{e.full} ({fmt(e.full_gain)}x, {fmt(e.full_s, 2)})" if k and e.full else ""
                lines.append(
                    f"| {label} | {factor - 1:+.0%} | {('yes: ' + (e.after or 'none worth it')) if k else 'no'} | "
                    f"{m['read']} / {fmt(m['delay_s'])} | {' / '.join(fmt(x) for x in cells[0])} | "
                    f"{' / '.join(fmt(x) for x in cells[1])} | {fmt(e.move_s * 1e3) if k else ''} | {full} |")
            lost = sum(v for r in results for v in r["lost"].values())
            if lost:
                lines.append(f"| {label} | {factor - 1:+.0%} | | {lost} requests lost | | | | |")
    if len(noise) > 1:
        lines.append(f"\nnoise floor (executed): the 'before' throughput, the same requests under the same plan, spreads "
                     f"{max(noise) / min(noise) - 1:.1%} over {len(noise)} runs")
    return "\n".join(lines)


def describe(plan) -> str:
    from exegpt.policies import describe as d

    return d(plan.schedule)


def false_alarms(num: int) -> str:
    """Alarms of the monitor fed ``num`` requests drawn from the workload it tests against (none drift)."""
    rows = ["| workload | requests | alarms | stated bound (alpha N / window) |", "|---|---|---|---|"]
    for w in (TINY_WORKLOAD, Workload.task("S"), Workload.task("C1")):
        opts = MonitorOptions()
        m = DriftMonitor(w, opts)
        x = w.sample(num, np.random.default_rng(11), joint=False)
        alarms = 0
        for i, (a, b) in enumerate(x):
            if m.observe(i, int(a), int(b)) is not None:
                alarms += 1
                m.reset(w)  # against the plan's lengths again (no refit: the rate is stated for those)
        rows.append(f"| {w.name} | {num} | {alarms} | {opts.alpha * num / opts.window:.2f} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=3000, help="requests of a simulated GPU run")
    ap.add_argument("--cpu-requests", type=int, default=800, help="requests of a tiny run (simulated and executed)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of each executed pair")
    ap.add_argument("--false-alarm-requests", type=int, default=20000)
    ap.add_argument("--skip-cpu", action="store_true", help="no executed runs")
    ap.add_argument("--skip-gpu", action="store_true", help="no simulated GPU runs")
    a = ap.parse_args(argv)
    print(table(not a.skip_gpu, not a.skip_cpu, a.requests, a.cpu_requests, a.rounds) + "\n")
    print(false_alarms(a.false_alarm_requests))


if __name__ == "__main__":
    main()
