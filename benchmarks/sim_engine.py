"""The simulated engine's speed and its agreement with the analytic estimate at saturation.

    python -m benchmarks.sim_engine [--requests 10000] [--repeat 3]

Prints (1) requests simulated per second on the paper's task S through RRA (OPT-13B, built-in GPU profiles; the
goal is 10,000 requests in under 2 s on two cores, so that a goodput bisection over a dozen rates stays under
30 s), (2) a goodput bisection's wall time and runs, and (3) for the best plan of each policy at a bound, the
simulated engine at saturation against the estimate (steady-window throughput, worst bound-length latency).
"""

from __future__ import annotations

import argparse
import time

from exegpt import Workload, find_schedule, run_simulated, static_schedule
from exegpt.search.goodput import SimulatedSearch, goodput
from exegpt.policies import describe
from exegpt.slo import RequestSLO


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=10000)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args(argv)
    w = Workload.task("S")

    print(f"## speed: task S, {a.requests} requests, best of {a.repeat}")
    print(f"{'devices':<8} {'schedule':<28} {'wall s':>7} {'req/s simulated':>16} {'iterations':>10}")
    for devices in ("1xA100", "4xA40"):
        plan = find_schedule(w, 20.0, devices=devices, policies=["rra"])
        best, rep = float("inf"), None
        for _ in range(a.repeat):
            t = time.perf_counter()
            rep = run_simulated(plan, num_requests=a.requests)
            best = min(best, time.perf_counter() - t)
        iters = round(rep.makespan_s / rep.decode_step_s) if rep.decode_step_s > 0 else 0
        print(f"{devices:<8} {describe(plan.schedule):<28} {best:>7.2f} {a.requests / best:>16.0f} {iters:>10}")

    print("\n## goodput bisection: task S on 2xA100, p90 TTFT <= 2 s and TPOT <= 0.15 s, 400 requests a run")
    plan = find_schedule(w, 20.0, devices="2xA100")
    runs = []
    import exegpt.search.goodput as gp
    real = gp.run_simulated

    def counted(*args, **kw):
        runs.append(1)
        return real(*args, **kw)

    gp.run_simulated = counted
    try:
        t = time.perf_counter()
        rate, _ = goodput(plan, RequestSLO(2.0, 0.15), options=SimulatedSearch(num_requests=400))
        wall = time.perf_counter() - t
    finally:
        gp.run_simulated = real
    print(f"{describe(plan.schedule)}: goodput {rate:.2f} req/s (estimated capacity "
          f"{plan.estimate.throughput_seq_s:.2f}), {len(runs)} simulated runs in {wall:.2f} s")

    print("\n## agreement at saturation (1,000 requests, seed 0): simulated / estimated")
    print(f"{'devices':<8} {'bound':>5} {'schedule':<36} {'thr est':>8} {'thr sim':>8} {'ratio':>6} "
          f"{'lat est':>8} {'lat sim':>8} {'ratio':>6}")
    for devices, bound in (("1xA100", 10.0), ("2xA100", 10.0), ("4xA40", 20.0)):
        picks = [find_schedule(w, bound, devices=devices, policies=list(pol))
                 for pol in (("rra",), ("waa_c", "waa_m")) if devices != "1xA100" or pol == ("rra",)]
        picks.append(static_schedule(w, bound * 3, devices=devices))
        for plan in picks:
            rep = run_simulated(plan, num_requests=1000)
            e = plan.estimate
            print(f"{devices:<8} {bound if plan.schedule.policy.value != 'static' else bound * 3:>5g} "
                  f"{describe(plan.schedule):<36} {e.throughput_seq_s:>8.2f} {rep.throughput_seq_s:>8.2f} "
                  f"{rep.throughput_seq_s / e.throughput_seq_s:>6.3f} {e.latency_s:>8.2f} {rep.latency_s:>8.2f} "
                  f"{rep.latency_s / e.latency_s:>6.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
