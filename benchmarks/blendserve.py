"""BlendServe's order against arrival order (FCFS, vLLM), DFS (SGLang: prefix sharing only) and a density-only order
(NanoFlow-Balance: no sharing) on four offline pools: compute density 1.4 and 0.9, prefix sharing 35 % and 5 %
(BlendServe's traces #1-#4), simulated at GPU scale and executed on the CPU with the simulated prediction beside.

    python -m benchmarks.blendserve [--requests 600] [--cpu-requests 64] [--cpu-models tiny smollm2] [--rounds 2]
                                    [--skip-cpu] [--skip-search]

Simulated (``exegpt.sim``, the shipped A100 data): Llama-2-7B (fp16) on one A100, ``--requests`` requests of each
pool (``exegpt.prefix_workload``; prompt plus output at most 2048 tokens), every order with the same knobs (chunked
prefill, S = 256 requests, a budget of 2048 + S tokens a step, blocks of 16, a sample of 5 % of the pool) and a
radix prefix cache of a quarter of the KV pool; each once with the engine running a step's decode and prompt chunks
one after the other (``sequential``, what the runner does) and once overlapped (NanoFlow's engine, BlendServe's
backend; ``BlendSchedule.overlap``). Throughput is BlendServe's: prompt and output tokens over the makespan;
``shared`` the prompt tokens the cache skipped over those a perfect cache skips (the pool's optimal sharing).
``searched``: the best of the blend's knobs (sampling fraction, split threshold, batch size) on the simulated engine.

Executed (``runner``, one CPU rank, fp32): the same orders on ``--cpu-requests`` requests of four mixes at CPU-sized
lengths (prompt plus output at most 256 tokens; densities 40 and 15 by the CPU's own ``kappa``, read off its
profile: ``CPU_MIXES``), S = 16, a budget of 144 tokens, a KV pool of 2048 tokens and a cache of 512, each model with
its cached CPU profile (``profiler.loop.cached_profile``); each cell is measured tok/s, and the simulated engine's
prediction on the same requests. Rounds run every order once each, interleaved; ``noise`` is the largest spread
between rounds of one cell, the floor any measured difference must clear.

Control: the shipped Azure traces' lengths with random prompts (almost no sharing), simulated as above.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import numpy as np

from exegpt import Workload, evaluate_schedule, run_simulated
from exegpt.blend_tree import ORDERS, machine_kappa, profile_kappa
from exegpt.models import get_model
from exegpt.policies.blendserve import BlendSchedule
from exegpt.prefix_workload import PoolOptions, random_prompt_pool, shared_prefix_pool

GPU_MODEL, GPU_DEVICES = "llama-2-7b", "1xA100"
MIXES = {"#1 rho1.4 s35%": (1.4, 0.35), "#2 rho0.9 s35%": (0.9, 0.35), "#3 rho1.4 s5%": (1.4, 0.05),
         "#4 rho0.9 s5%": (0.9, 0.05)}
CPU_MIXES = {"#1' rho40 s35%": (40.0, 0.35), "#2' rho15 s35%": (15.0, 0.35), "#3' rho40 s5%": (40.0, 0.05),
             "#4' rho15 s5%": (15.0, 0.05)}
"""On a CPU a GEMM token costs hundreds of KV-token reads (``profile_kappa``): every pool of CPU-sized lengths is
compute-bound, so the executed mixes are the same four at densities the CPU's lengths reach."""


def tokens_per_s(pool, rep) -> float:
    return float(pool.lengths.sum() / rep.makespan_s) if rep.makespan_s > 0 else math.nan


def shared(pool, rep) -> float:
    optimal = pool.sharing * pool.lengths[:, 0].sum()
    return rep.cached_tokens / optimal if optimal else math.nan


def plan_for(schedule: BlendSchedule, pool, kv_tokens: float | None = None, **where):
    plan = evaluate_schedule(schedule, Workload.from_pairs(pool.lengths.tolist(), name="pool"), **where)
    if kv_tokens is not None:
        plan = dataclasses.replace(plan, estimate=dataclasses.replace(plan.estimate, kv_tokens=kv_tokens))
    return plan


def simulated_table(requests: int, search: bool) -> str:
    kappa = machine_kappa(GPU_MODEL, GPU_DEVICES)
    rows = ["| pool | engine | sharing | density | " + " | ".join(ORDERS[::-1]) + " | blend / FCFS | blend / DFS |"
            + (" searched (knobs) |" if search else ""),
            "|---|---|---|---|" + "---|" * (len(ORDERS) + 2) + ("---|" if search else "")]
    for (name, (rho, s)), overlap in [(m, o) for m in MIXES.items() for o in (False, True)]:
        pool = shared_prefix_pool(PoolOptions(requests, s, rho, kappa, 2048, 32000, seed=7))
        base = plan_for(BlendSchedule(2048 + 256, 256, 1, 0, 1), pool, model=GPU_MODEL, devices=GPU_DEVICES)
        cache = int(base.estimate.kv_tokens // 4)
        res = {}
        for order in ORDERS[::-1]:
            sched = BlendSchedule(2048 + 256, 256, 1, 0, 1, order=order, sample_frac=0.05, split_t=1024.0,
                                  prefix_tokens=cache, overlap=overlap)
            rep = run_simulated(plan_for(sched, pool, model=GPU_MODEL, devices=GPU_DEVICES), lengths=pool.lengths,
                                prompts=pool.prompts)
            res[order] = (tokens_per_s(pool, rep), shared(pool, rep))
        cells = [f"{res[o][0]:,.0f} tok/s, {res[o][1]:.0%} shared" for o in ORDERS[::-1]]
        engine = "overlapped" if overlap else "sequential"
        row = (f"| {name} | {engine} | {pool.sharing:.0%} | {pool.density:.2f} | " + " | ".join(cells)
               + f" | {res['blend'][0] / res['fcfs'][0]:.3f}x | {res['blend'][0] / res['dfs'][0]:.3f}x |")
        if search and overlap:
            best = None
            for frac in (0.05, 0.2):
                for split in (0.0, 1024.0, 4096.0):
                    for seqs in (128, 256):
                        sched = BlendSchedule(2048 + seqs, seqs, 1, 0, 1, "blend", frac, split, cache,
                                              overlap=True)
                        rep = run_simulated(plan_for(sched, pool, model=GPU_MODEL, devices=GPU_DEVICES),
                                            lengths=pool.lengths, prompts=pool.prompts)
                        thr = tokens_per_s(pool, rep)
                        if best is None or thr > best[0]:
                            best = (thr, f"p_s={frac:g} t={split:g} S={seqs}")
            row += f" {best[0]:,.0f} tok/s ({best[1]}; {best[0] / res['fcfs'][0]:.3f}x FCFS) |"
        elif search:
            row += " |"
        rows.append(row)
    return "\n".join(rows)


def control_table(requests: int) -> str:
    """The shipped traces' lengths with random prompts (almost no sharing), sequential engine."""
    kappa = machine_kappa(GPU_MODEL, GPU_DEVICES)
    rows = ["| trace | sharing | density | " + " | ".join(ORDERS[::-1]) + " | blend / FCFS |",
            "|---|---|---|" + "---|" * (len(ORDERS) + 1)]
    for name in ("azure_conv", "azure_code"):
        w = Workload.trace(name).within_context(2048, how="clip")[0]
        pool = random_prompt_pool(w, requests, 32000, kappa, seed=7)
        base = plan_for(BlendSchedule(2048 + 256, 256, 1, 0, 1), pool, model=GPU_MODEL, devices=GPU_DEVICES)
        res = {}
        for order in ORDERS[::-1]:
            sched = BlendSchedule(2048 + 256, 256, 1, 0, 1, order=order, sample_frac=0.05, split_t=1024.0,
                                  prefix_tokens=int(base.estimate.kv_tokens // 4))
            rep = run_simulated(plan_for(sched, pool, model=GPU_MODEL, devices=GPU_DEVICES), lengths=pool.lengths,
                                prompts=pool.prompts)
            res[order] = tokens_per_s(pool, rep)
        rows.append(f"| {name} | {pool.sharing:.1%} | {pool.density:.2f} | "
                    + " | ".join(f"{res[o]:,.0f}" for o in ORDERS[::-1]) + f" | {res['blend'] / res['fcfs']:.3f}x |")
    return "\n".join(rows)


def cpu_table(models: list[str], requests: int, rounds: int) -> str:
    from profiler.loop import cached_profile
    from runner.requests import requests_of
    from runner.run import run_plans

    rows = ["| model | pool | sharing | density | " + " | ".join(ORDERS[::-1]) + " | blend / FCFS | noise |",
            "|---|---|---|---|" + "---|" * (len(ORDERS) + 2)]
    for model in models:
        prof = cached_profile(model, tp_degrees=(1,), progress=False)
        kappa = profile_kappa(prof)
        for mix, (rho, s) in CPU_MIXES.items():
            pool = shared_prefix_pool(PoolOptions(requests, s, rho, kappa, 256, get_model(prof.model).vocab_size,
                                                  seed=7))
            plans = [plan_for(BlendSchedule(128 + 16, 16, 1, 0, 1, order=o, sample_frac=0.1, split_t=64.0,
                                            prefix_tokens=512, block_size=16, kappa=kappa), pool, kv_tokens=2048.0,
                              profile=prof, devices="1xcpu") for o in ORDERS[::-1]]
            measured = {o: [] for o in ORDERS}
            for _ in range(rounds):
                for o, rep in zip(ORDERS[::-1], run_plans(plans, model, requests=requests_of(pool))):
                    measured[o].append((tokens_per_s(pool, rep), shared(pool, rep)))
            sims = {o: tokens_per_s(pool, run_simulated(p, prof, lengths=pool.lengths, prompts=pool.prompts))
                    for o, p in zip(ORDERS[::-1], plans)}
            med = {o: float(np.median([m for m, _ in measured[o]])) for o in ORDERS}
            noise = max((max(m for m, _ in v) - min(m for m, _ in v)) / med[o] for o, v in measured.items())
            cells = [f"{med[o]:,.0f} / {sims[o]:,.0f} ({measured[o][0][1]:.0%})" for o in ORDERS[::-1]]
            rows.append(f"| {model} | {mix} | {pool.sharing:.0%} | {pool.density:.2f} | " + " | ".join(cells)
                        + f" | {med['blend'] / med['fcfs']:.3f}x (sim {sims['blend'] / sims['fcfs']:.3f}x) | "
                        f"{noise:.1%} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--cpu-requests", type=int, default=64)
    ap.add_argument("--cpu-models", nargs="+", default=["tiny", "smollm2"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--skip-cpu", action="store_true")
    ap.add_argument("--skip-sim", action="store_true")
    ap.add_argument("--skip-search", action="store_true")
    ap.add_argument("--only-control", action="store_true", help="the control traces' table alone")
    a = ap.parse_args()
    if a.only_control:
        print(control_table(a.requests))
        return
    if not a.skip_sim:
        print(f"Simulated: {GPU_MODEL} on {GPU_DEVICES}, {a.requests} requests a pool (tok/s, prompt tokens the "
              f"cache skipped / a perfect cache's)\n")
        print(simulated_table(a.requests, not a.skip_search))
        print("\nControl: shipped traces (clipped to 2048 tokens), random prompts, sequential engine, tok/s\n")
        print(control_table(a.requests))
    if not a.skip_cpu:
        import torch

        torch.set_num_threads(1)
        print(f"\nExecuted on one CPU rank: measured / simulated tok/s (shared), {a.cpu_requests} requests a pool, "
              f"median of {a.rounds} interleaved rounds\n")
        print(cpu_table(a.cpu_models, a.cpu_requests, a.rounds))


if __name__ == "__main__":
    main()
