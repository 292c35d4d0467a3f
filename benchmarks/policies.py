"""Every policy on the same profile, workloads and bounds: ExeGPT's own schedules against the baselines.

    python -m benchmarks.policies [--quick] [--table 1|2|3] [--plot docs/policies.png]

Table 1 (the paper's bound, form (a)): for the paper's five tasks at four bounds (1.2, 1.5, 2 and 3 times the
smallest bound RRA or WAA meets) on OPT-13B / 4xA40 and Llama-2-7B / 2xA100, and for the three shipped traces
(requests longer than the model's context dropped), the best estimated throughput of RRA, WAA (C or M), static
batching (its bound on the longest output, as in the paper), continuous batching, chunked prefill,
prefill/decode disaggregation and Shift Parallelism (the last four on a grid of their knobs, each point's
estimate: they have no sound box bound). Then ExeGPT's pick (the best of RRA and WAA) over static batching and over
the best baseline (the last four), and what the optimizer picks across all of them.

Table 2 (SLO form (c)): goodput (the highest arrival rate keeping p90 TTFT and TPOT bounds) of each policy's best
schedule, searched on the simulated engine, on the Azure conversation trace: its requests and its own timestamps,
replayed faster or slower to find the rate; then the optimizer across all of them.

Table 3 (one device): Splitwiser's two processes on one device against continuous batching in one process that
alternates the phases on it, and against WAA and disaggregation on two devices: each policy's best schedule at
twice the smallest bound, simulated on GPUs (the interference from ``exegpt.share_roofline``); then executed
beside simulated on this CPU, the interference measured by the profiler in the same run
(``benchmarks.splitwiser``).
"""

from __future__ import annotations

import argparse
import itertools
import math
import time

import numpy as np

from exegpt import (InfeasibleBoundError, RequestSLO, SearchSpace, Workload, find_schedule, smallest_feasible_bound,
                    static_schedule)
from exegpt.errors import ExeGPTError
from exegpt.models import get_model
from exegpt.problem import problem
from exegpt.policies import describe
from exegpt.search.goodput import SimulatedSearch
from exegpt.search.optimize import GRID_POINTS, simulated_candidates
from exegpt.plan import SearchStats

FACTORS = (1.2, 1.5, 2.0, 3.0)
SETTINGS = (("opt-13b", "4xA40"), ("llama-2-7b", "2xA100"))


def fitting(w: Workload, model: str) -> Workload:
    """A trace's requests whose prompt fits 3/4 of the model's context and output 1/4 (the longest prompt and the
    longest output then fit together), with their timestamps; the others dropped."""
    ctx = get_model(model).max_seq_len
    pairs = np.asarray(w.pairs)
    keep = (pairs[:, 0] <= 3 * ctx // 4) & (pairs[:, 1] <= ctx // 4)
    arr = None if w.arrivals_s is None else np.asarray(w.arrivals_s)[keep]
    return Workload.from_pairs(pairs[keep], arr, name=f"{w.name} ({keep.mean():.0%} kept)")


def best(fn) -> tuple[float, str]:
    try:
        plan = fn()
    except (InfeasibleBoundError, ExeGPTError):
        return math.nan, "infeasible"
    return plan.estimate.throughput_seq_s, describe(plan.schedule)


def best_grid(policy: str, w: Workload, bound: float, model: str, devices: str) -> tuple[float, str]:
    """A policy without a box bound: its best estimate over its knob grid whose bound-length latency meets
    ``bound`` (what ``find_schedule`` searches for it)."""
    prob = problem(w, bound, model=model, devices=devices)
    out = (math.nan, "infeasible")
    for _, _, make_plan in simulated_candidates(prob, (policy,), None, SearchSpace(), (prob.cluster.count,),
                                                GRID_POINTS):
        plan = make_plan(SearchStats("grid", 0, 0.0))
        e = plan.estimate
        if e.latency_s <= bound and not e.throughput_seq_s <= out[0]:
            out = (e.throughput_seq_s, describe(plan.schedule))
    return out


BASELINES = ("cb", "chunked", "disagg", "shift")


def _value(x: tuple[float, str]) -> float:
    return -1.0 if math.isnan(x[0]) else x[0]


def table1(quick: bool) -> None:
    print("## Table 1: throughput (seq/s, estimated) at each bound, every policy")
    print(f"{'model/devices':<18} {'workload':<26} {'bound s':>7} {'RRA':>7} {'WAA':>7} {'static':>7} {'CB':>7} "
          f"{'chunk':>7} {'disagg':>7} {'shift':>7} {'pick':>7} {'/static':>7} {'/base':>6}  {'optimizer':<40} pick")
    for model, devices in SETTINGS[:1] if quick else SETTINGS:
        gains_static, gains_base, wins = [], [], {}
        workloads = [Workload.task(t) for t in (("S", "C1") if quick else ("S", "T", "G", "C1", "C2"))]
        if not quick:
            workloads += [fitting(Workload.trace(t), model) for t in ("arxiv", "azure_conv", "azure_code")]
        for w in workloads:
            try:
                low = smallest_feasible_bound(w, model=model, devices=devices)
            except (InfeasibleBoundError, ExeGPTError):
                print(f"{model + '/' + devices:<18} {w.name[:26]:<26} infeasible on this cluster")
                continue
            for f in FACTORS[:2] if quick else FACTORS:
                b = low * f
                kw = dict(model=model, devices=devices)
                rra = best(lambda: find_schedule(w, b, policies=["rra"], **kw))
                waa = best(lambda: find_schedule(w, b, policies=["waa_c", "waa_m"], **kw))
                static = best(lambda: static_schedule(w, b, **kw))
                base = {p: best_grid(p, w, b, model, devices) for p in BASELINES}
                top = max(base.values(), key=_value)
                pick = max((rra, waa), key=_value)
                opt = best(lambda: find_schedule(w, b, **kw))
                gs = pick[0] / static[0] if static[0] > 0 else math.nan
                gb = pick[0] / top[0] if top[0] > 0 else math.nan
                if not math.isnan(gs):
                    gains_static.append(gs)
                if not math.isnan(gb):
                    gains_base.append(gb)
                    if gb < 1:
                        winner = max(base, key=lambda p: _value(base[p]))
                        wins[winner] = wins.get(winner, 0) + 1
                print(f"{model + '/' + devices:<18} {w.name[:26]:<26} {b:>7.2f} {rra[0]:>7.2f} {waa[0]:>7.2f} "
                      f"{static[0]:>7.2f} " + "".join(f"{base[p][0]:>7.2f} " for p in BASELINES) +
                      f"{pick[0]:>7.2f} {gs:>7.2f} {gb:>6.2f}  {opt[1]:<40} {pick[1]}")
        if gains_static:
            print(f"{model}/{devices}: pick / static: mean {np.mean(gains_static):.2f}x, max {max(gains_static):.2f}x "
                  f"over {len(gains_static)} cells; pick / best baseline: mean {np.mean(gains_base):.2f}x, min "
                  f"{min(gains_base):.2f}x, max {max(gains_base):.2f}x over {len(gains_base)} cells; a baseline wins "
                  f"{sum(wins.values())} ({wins}); the optimizer takes the best of all in every cell")


def table2(quick: bool) -> None:
    model, devices = "llama-2-7b", "2xA100"
    w = fitting(Workload.trace("azure_conv"), model)
    slo = RequestSLO(ttft_s=2.0, tpot_s=0.1, percentile=90)
    opts = SimulatedSearch(num_requests=300, max_simulated=6, arrivals="trace")
    print(f"\n## Table 2: goodput on {w.name}'s own timestamps, {slo.describe()}, {model}/{devices}")
    print(f"{'policy':<8} {'goodput req/s':>14} {'speed-up':>9} {'search s':>9}  schedule")
    span = w.arrivals_s[-1] - w.arrivals_s[0]
    base = (len(w.pairs) - 1) / span
    for pols in (("rra",), ("waa_c", "waa_m")) + tuple((p,) for p in BASELINES) + (None,):
        t0 = time.perf_counter()
        try:
            plan = find_schedule(w, slo, model=model, devices=devices, policies=pols and list(pols), simulated=opts)
            g, what = plan.slo_check.goodput_rps, describe(plan.schedule)
        except (InfeasibleBoundError, ExeGPTError) as e:
            g, what = 0.0, f"infeasible: {str(e)[:60]}"
        print(f"{'/'.join(pols or ('all',)):<8} {g:>14.2f} {g / base:>8.1f}x {time.perf_counter() - t0:>9.1f}  {what}")


ONE_DEVICE = (("llama-2-7b", "A100"), ("opt-13b", "A40"))


def table3(quick: bool, requests: int, rounds: int) -> None:
    """Splitwiser (two processes on one device) against one process alternating the phases on that device and
    against WAA and disaggregation on two devices: simulated on GPUs (each policy's best schedule at the bound),
    then executed beside simulated on the CPU with the interference the profiler measures in the same run."""
    from exegpt.policies import disagg
    from exegpt.policies.splitwiser import phase_pricing
    from exegpt.sim import run_simulated

    print("\n## Table 3: one device, two processes (Splitwiser), simulated on GPUs at 2x the smallest bound and "
          "at peak (no bound)")
    print("| model/device | task | bound | policy (devices) | est. seq/s | sim seq/s | TTFT p50 s | TPOT p50 ms | "
          "x alternate (sim) | kappa prefill / decode | schedule |\n|---|---|---|---|---|---|---|---|---|---|---|")
    tasks = ("S",) if quick else ("S", "C1")
    cases = [(m, d, t) for m, d in (ONE_DEVICE[:1] if quick else ONE_DEVICE) for t in tasks]
    for (model, dev, task), peak in itertools.product(cases, (False, True)):
        w = Workload.task(task)
        b = math.inf if peak else 2 * smallest_feasible_bound(w, model=model, devices=f"1x{dev}")
        rows, base = [], None
        for pols, n in ((["cb"], 1), (["splitwiser"], 1), (["waa_c", "waa_m"], 2), (["disagg"], 2)):
            try:
                plan = find_schedule(w, b, model=model, devices=f"{n}x{dev}", policies=pols)
            except (InfeasibleBoundError, ExeGPTError):
                rows.append((pols, n, None, None, "-"))
                continue
            rep = run_simulated(plan, num_requests=300)
            kap = "-"
            if pols == ["splitwiser"]:
                prob = problem(w, b, model=model, devices=f"1x{dev}")
                sw = plan.schedule
                price = phase_pricing(prob, sw)
                bp = disagg.mean_prefill_batch(prob, sw)
                kap = f"{price('encode', bp)[1]:.2f} / {price('decode', sw.max_num_seqs)[1]:.2f}"
            base = rep.throughput_seq_s if pols == ["cb"] else base
            rows.append((pols, n, plan, rep, kap))
        for pols, n, plan, rep, kap in rows:
            name, bound = f"{'/'.join(pols)} ({n})", "peak" if peak else f"{b:.1f} s"
            if plan is None:
                print(f"| {model}/{dev} | {task} | {bound} | {name} | infeasible | | | | | | |")
                continue
            ratio = rep.throughput_seq_s / base if base else math.nan
            print(f"| {model}/{dev} | {task} | {bound} | {name} | {plan.estimate.throughput_seq_s:.2f} | "
                  f"{rep.throughput_seq_s:.2f} | {rep.ttft.p50:.2f} | {rep.tpot.p50 * 1e3:.1f} | {ratio:.2f}x | "
                  f"{kap} | {describe(plan.schedule)} |")
    from benchmarks.splitwiser import executed_with_interference

    print("\n## Table 3, executed: tiny on this CPU, one device = one core (WAA's two devices: two cores), "
          "measured / simulated\n")
    print(executed_with_interference("tiny", requests, rounds, skip=("splitwiser 2+2", "splitwiser 1+1 ipc"),
                                     device_cores=1))


def figure(path: str) -> None:
    """Throughput against the bound, every policy, two settings: the frontier of each (``exegpt.plot``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from exegpt.plot import frontier_figure

    cases = (("opt-13b", "4xA40", "S"), ("llama-2-7b", "2xA100", "C1"))
    fig, axes = plt.subplots(1, len(cases), figsize=(13, 4.6))
    for ax, (model, devices, task) in zip(axes, cases):
        w = Workload.task(task)
        low = smallest_feasible_bound(w, model=model, devices=devices)
        frontier_figure(w, np.geomspace(low, 4 * low, 14), ax=ax, model=model, devices=devices)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="two tasks, two bounds, one setting")
    p.add_argument("--plot", metavar="PNG", help="only draw every policy's throughput against the bound to PNG")
    p.add_argument("--table", type=int, choices=(1, 2, 3), help="only this table")
    p.add_argument("--requests", type=int, default=64, help="table 3's executed requests a run")
    p.add_argument("--rounds", type=int, default=3, help="table 3's interleaved rounds")
    a = p.parse_args(argv)
    if a.plot:
        figure(a.plot)
        return 0
    if a.table in (None, 1):
        table1(a.quick)
    if a.table in (None, 2):
        table2(a.quick)
    if a.table in (None, 3):
        table3(a.quick, a.requests, a.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
