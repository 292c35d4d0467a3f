"""Floods: many requests at once through the simulated engine and through the runner, and the memory they take.

    python -m benchmarks.floods [--sim-requests 20000] [--run-requests 2000]

Each load runs in a fresh process, so the peak resident memory it reports is its own (and its ranks'): the
simulated engine serves the paper's task S on 1xA100 (built-in profile) through RRA and continuous batching; the
runner serves the ``tiny`` preset on one CPU rank through RRA (a plan found on the shipped test profile). Each at
a tenth of the load and at the full load; printed: requests finished and failed (every one must be accounted
for), wall time, the peak RSS of the process and of its largest rank, and full over tenth.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_PROFILE = ROOT / "tests" / "data" / "tiny-cpu.json"


def _child(engine: str, policy: str, n: int) -> dict:
    from exegpt import Profile, Workload, find_schedule, run_simulated

    t = time.perf_counter()
    if engine == "simulated":
        plan = find_schedule(Workload.task("S"), 20.0, devices="1xA100", policies=[policy])
        rep = run_simulated(plan, num_requests=n)
    else:
        from runner import run_plan

        prof = Profile.load(TINY_PROFILE)
        w = Workload.truncated_normal(input=(24, 10, 48), output=(16, 6, 32))
        plan = find_schedule(w, 1.0, profile=prof, devices="1xcpu", policies=[policy])
        rep = run_plan(plan, "tiny", num_requests=n, timeout_s=3600)
    wall = time.perf_counter() - t
    kb = 1024
    return {"finished": rep.num_finished, "failed": rep.num_failed, "wall_s": wall,
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kb,
            "ranks_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / kb}


def _load(engine: str, policy: str, n: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.floods", "--child", engine, policy, str(n)], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sim-requests", type=int, default=20000)
    p.add_argument("--run-requests", type=int, default=2000)
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(_child(a.child[0], a.child[1], int(a.child[2]))))
        return 0
    print("| engine, policy | requests | finished | failed | wall s | peak RSS MB | largest rank MB | "
          "RSS full / tenth |")
    print("|---|---|---|---|---|---|---|---|")
    for engine, policy, n in (("simulated", "rra", a.sim_requests), ("simulated", "cb", a.sim_requests),
                              ("runner", "rra", a.run_requests)):
        small, full = _load(engine, policy, max(1, n // 10)), _load(engine, policy, n)
        for load, r in ((max(1, n // 10), small), (n, full)):
            lost = load - r["finished"] - r["failed"]
            ratio = f"{full['rss_mb'] / small['rss_mb']:.2f}x" if r is full else ""
            ranks = f"{r['ranks_mb']:.0f}" if engine == "runner" else "-"
            failed = f"{r['failed']:,}" + (f" (LOST {lost})" if lost else "")
            print(f"| {engine}, {policy} | {load:,} | {r['finished']:,} | {failed} | {r['wall_s']:.1f} | "
                  f"{r['rss_mb']:.0f} | {ranks} | {ratio} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
