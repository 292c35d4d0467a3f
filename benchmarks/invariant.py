"""What batch-invariant numerics cost (``runner.numerics``): the same plans on the same requests with and
without them, interleaved, and whether each request's tokens equal single-request decoding.

    python -m benchmarks.invariant [--model smollm2] [--dtype bf16] [--requests 16] [--rounds 3]

Plans: continuous batching (S = 8) and RRA (B_E = 4, N_D = 8) on one rank. Printed per plan and mode: the median
throughput over the rounds, the ratio of batch-invariant over default in each round, and how many requests'
tokens differ from single-request greedy decoding in the same mode.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from exegpt import Estimate, LatencyBound, Plan, RRASchedule, Stage, Workload
from exegpt.policies import describe
from exegpt.policies.cb import CBSchedule
from runner import numerics
from runner.generate import greedy_reference
from runner.requests import make_requests
from runner.run import model_args, run_plan
from runner.weights import load_model

WORKLOAD = Workload.truncated_normal((24, 10, 48), (16, 6, 32))


def plan_of(schedule, n_layers: int) -> Plan:
    est = Estimate(throughput_seq_s=1.0, throughput_tok_s=1.0, latency_s=1.0, latency_len=16, encode_stage_s=0.0,
                   decode_step_s=0.0, decode_batch=8.0)
    return Plan(schedule=schedule, estimate=est, bound=LatencyBound(100.0), profile_id="-", model="-",
                devices="1xCPU", workload=WORKLOAD, stages=(Stage("both", 1, 0, n_layers),))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="bf16", choices=("fp32", "bf16"))
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    args = model_args(a.model)
    reqs = make_requests(WORKLOAD, a.requests, args.vocab_size, seed=0)
    model, _, _ = load_model(a.model, dtype=torch.bfloat16 if a.dtype == "bf16" else torch.float32)
    refs = {}
    for mode in (False, True):
        with numerics.batch_invariant(mode):
            refs[mode] = {r.id: greedy_reference(model, list(r.prompt), r.output_len) for r in reqs}
    plans = [plan_of(s, args.n_layers) for s in (CBSchedule(8, 128, 1, 0, 1), RRASchedule(4, 8, 1, 0, 1))]
    runs = {(i, mode): [] for i in range(len(plans)) for mode in (False, True)}
    for _ in range(a.rounds):
        for i, plan in enumerate(plans):
            for mode in (False, True):
                rep = run_plan(plan, a.model, requests=reqs, dtype=a.dtype, keep_tokens=True, batch_invariant=mode)
                differ = sum(list(r.tokens) != refs[mode][r.id] for r in rep.requests)
                runs[i, mode].append((rep.throughput_seq_s, differ))
    print(f"{a.model} {a.dtype}, {a.requests} requests, {a.rounds} interleaved rounds; medians")
    print(f"{'plan':<28} {'mode':<16} {'seq/s':>8} {'invariant/default per round':>28} {'tokens differ':>14}")
    for i, plan in enumerate(plans):
        ratios = [b[0] / d[0] for d, b in zip(runs[i, False], runs[i, True])]
        for mode in (False, True):
            xs = runs[i, mode]
            print(f"{describe(plan.schedule):<28} {'batch-invariant' if mode else 'default':<16} "
                  f"{statistics.median(x[0] for x in xs):>8.2f} "
                  f"{' '.join(f'{r:.2f}' for r in ratios) if mode else '':>28} {max(x[1] for x in xs):>14}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
