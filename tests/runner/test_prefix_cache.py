"""The runner's prefix cache (``runner.prefix_pool`` under ``exegpt.radix``): a pool with shared prefixes run with
sharing on and off gives the same greedy tokens, those of single-request decoding, and both engines make the same
decisions and skip the same prompt tokens."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from exegpt import Profile, Workload, evaluate_schedule, run_simulated
from exegpt.blend_tree import machine_kappa
from exegpt.policies.blendserve import BlendSchedule
from exegpt.policies.chunked import ChunkedSchedule
from exegpt.prefix_workload import PoolOptions, shared_prefix_pool
from runner.generate import greedy_reference
from runner.requests import requests_of
from runner.run import run_plans
from runner.weights import load_model

PROFILE = Path(__file__).resolve().parents[1] / "data" / "tiny-cpu.json"


def test_prefix_sharing_keeps_greedy_tokens_and_both_engines_agree():
    torch.set_num_threads(1)
    prof = Profile.load(PROFILE)
    pool = shared_prefix_pool(PoolOptions(40, 0.35, 1.5, machine_kappa("tiny", "1xcpu"), 96, 256, seed=3))
    W = Workload.from_pairs(pool.lengths.tolist())
    scheds = [BlendSchedule(40, 8, 1, 0, 1, order="blend", sample_frac=0.1, split_t=20.0, prefix_tokens=120,
                            block_size=8),  # a cache smaller than the pool's prefixes: evictions
              BlendSchedule(40, 8, 1, 0, 1, order="dfs", prefix_tokens=4096, block_size=8),
              BlendSchedule(40, 8, 1, 0, 1, order="dfs", prefix_tokens=0, block_size=8),
              ChunkedSchedule(40, 8, 1, 0, 1, block_size=8)]
    plans = []
    for s in scheds:  # a KV pool of 50 blocks: preemptions and recomputes too
        plan = evaluate_schedule(s, W, profile=prof, devices="1xcpu")
        plans.append(dataclasses.replace(plan, estimate=dataclasses.replace(plan.estimate, kv_tokens=400.0)))
    reqs = requests_of(pool)
    reps = run_plans(plans, "tiny", requests=reqs, log_decisions=True, keep_tokens=True)
    ref = {r.id: r.tokens for r in reps[-1].requests}
    model, _, _ = load_model("tiny")
    for r in reqs[:6]:
        assert list(ref[r.id]) == greedy_reference(model, list(r.prompt), r.output_len)
    for plan, rep in zip(plans, reps):
        sim = run_simulated(plan, prof, lengths=pool.lengths, prompts=pool.prompts, log_decisions=True)
        assert rep.num_finished == sim.num_finished == len(reqs)
        assert rep.decisions and rep.decisions == sim.decisions
        assert {r.id: r.tokens for r in rep.requests} == ref
        assert rep.cached_tokens == sim.cached_tokens
    optimal = pool.sharing * pool.lengths[:, 0].sum()
    assert 0 < reps[0].cached_tokens < reps[1].cached_tokens <= optimal  # the small cache evicted some
    assert reps[2].cached_tokens == reps[3].cached_tokens == 0
    assert any("Evict" in d for d in reps[0].decisions)
    # Requests were taken out of arrival order, and some started from a cached prefix.
    firsts = [int(d.split("((")[1].split(",")[0]) for d in reps[1].decisions if "Chunk" in d]
    assert firsts != sorted(firsts)
