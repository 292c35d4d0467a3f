"""One driver per policy, two engines: on the same requests the runner and the simulated engine (``exegpt.sim``)
make the same decisions in the same order, whatever the steps cost, and the runner's tokens are the greedy
reference's (``test_executors``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from exegpt import Arrivals, Policy, Profile, RRASchedule, StaticSchedule, WAASchedule, Workload, \
    evaluate_schedule, run_simulated
from exegpt.policies.blendserve import BlendSchedule
from exegpt.policies.cb import CBSchedule
from exegpt.policies.chunked import ChunkedSchedule
from exegpt.policies.disagg import DisaggSchedule
from exegpt.policies.splitwiser import SplitwiserSchedule
from exegpt.report import FAILED, FINISHED
from runner.run import run_plan

PROFILE = Path(__file__).resolve().parents[1] / "data" / "tiny-cpu.json"
W = Workload.truncated_normal(input=(24, 10, 48), output=(16, 8, 40))


@pytest.mark.parametrize("schedule,devices", [
    (RRASchedule(2, 3, 1, 0, 1), "1xcpu"), (RRASchedule(4, 8, 1, 0, 1), "1xcpu"),
    (RRASchedule(3, 39, 1, 0, 1), "1xcpu"),
    (StaticSchedule(5, 1, 1), "1xcpu"), (WAASchedule(Policy.WAA_C, 2, 8, 1, 0, 1, 1), "2xcpu"),
    (CBSchedule(8, 128, 1, 0, 1, block_size=8), "1xcpu"), (ChunkedSchedule(20, 6, 1, 0, 1, block_size=8), "1xcpu"),
    (BlendSchedule(20, 6, 1, 0, 1, sample_frac=0.1, split_t=16.0, prefix_tokens=64, block_size=8), "1xcpu")])
def test_both_engines_make_the_same_decisions(schedule, devices):
    torch.set_num_threads(1)
    prof = Profile.load(PROFILE)
    plan = evaluate_schedule(schedule, W, profile=prof, devices=devices)
    if isinstance(schedule, (CBSchedule, ChunkedSchedule, BlendSchedule)):  # a KV pool of 25 blocks: preemptions
        plan = dataclasses.replace(plan, estimate=dataclasses.replace(plan.estimate, kv_tokens=200.0))
    rep = run_plan(plan, "tiny", num_requests=40, seed=5, log_decisions=True)
    sim = run_simulated(plan, prof, num_requests=40, seed=5, log_decisions=True)
    assert rep.num_finished == sim.num_finished == 40
    group = "decode" if isinstance(schedule, WAASchedule) else "main"
    assert rep.decisions and rep.decisions == tuple(d for d in sim.decisions if d.startswith(group))
    if isinstance(schedule, (CBSchedule, ChunkedSchedule, BlendSchedule)):
        assert sum("Evict" in d for d in rep.decisions) > 5 and any("resume=True" in d for d in rep.decisions)
    assert rep.decode_batch == sim.decode_batch and rep.latency_len == sim.latency_len
    assert sim.engine == "simulated" and rep.engine == "runner"


@pytest.mark.parametrize("schedule,devices", [(RRASchedule(3, 4, 1, 0, 1), "1xcpu"),
                                              (WAASchedule(Policy.WAA_C, 2, 8, 1, 0, 1, 1), "2xcpu"),
                                              (DisaggSchedule(8, 96, 1, 1), "2xcpu"),
                                              (SplitwiserSchedule(8, 96), "1xcpu")])
def test_arrivals_are_honoured_by_both_engines(schedule, devices):
    """Poisson arrivals: no request starts before it arrives, each engine reports the same per-request fields."""
    torch.set_num_threads(1)
    prof = Profile.load(PROFILE)
    plan = evaluate_schedule(schedule, W, profile=prof, devices=devices)
    arr = Arrivals.poisson(40.0)
    for rep in (run_plan(plan, "tiny", num_requests=24, seed=2, arrivals=arr),
                run_simulated(plan, prof, num_requests=24, seed=2, arrivals=arr)):
        assert rep.num_finished == 24
        arrival = np.array([r.arrival_s for r in rep.requests])
        assert arrival[0] == 0 and (np.diff(arrival) > 0).all() and arrival[-1] > 0.2
        for r in rep.requests:
            assert r.status == FINISHED
            assert r.arrival_s <= r.encode_start_s <= r.first_token_s <= r.finish_s
            assert r.ttft_s >= r.queue_s >= 0 and r.e2e_s >= r.ttft_s
        assert rep.ttft.p50 <= rep.ttft.p90 <= rep.ttft.p99 and rep.e2e.p99 >= rep.ttft.p99
        assert rep.tpot.p50 > 0


def test_a_cut_short_run_accounts_for_every_request():
    prof = Profile.load(PROFILE)
    plan = evaluate_schedule(RRASchedule(2, 4, 1, 0, 1), W, profile=prof, devices="1xcpu")
    full = run_simulated(plan, prof, num_requests=200, seed=1, arrivals=Arrivals.poisson(400.0))
    cut = run_simulated(plan, prof, num_requests=200, seed=1, arrivals=Arrivals.poisson(400.0),
                        horizon_s=full.makespan_s / 2)
    reasons = {r.reason for r in cut.requests if r.status == FAILED}
    assert 0 < cut.num_finished < 200 and cut.num_finished + cut.num_failed == 200
    assert reasons == {"the run ended before the request finished", "still queued when the run ended"}
    # Deterministic under a seed; a different seed draws other requests.
    assert run_simulated(plan, prof, num_requests=200, seed=1, arrivals=Arrivals.poisson(400.0)) == full
    assert run_simulated(plan, prof, num_requests=200, seed=2, arrivals=Arrivals.poisson(400.0)) != full


def test_shift_parallelism_configurations_on_two_ranks():
    """Shift (both modes), DP and TP on two gloo ranks: the simulated engine's decisions, every request
    finished, and the greedy tokens of a one-rank run of the same requests."""
    from exegpt.policies.shift import ShiftSchedule
    from runner.run import run_plans

    torch.set_num_threads(1)
    prof = Profile.load(PROFILE)
    scheds = [ShiftSchedule(40, 6, 2, 1, 16, 1, 2, block_size=8), ShiftSchedule(40, 6, 1, 1, 16, 2, 2, block_size=8),
              ShiftSchedule(40, 6, 1, 2, 16, 1, 2, block_size=8), ChunkedSchedule(40, 6, 1, 0, 1, block_size=8)]
    plans = []
    for s in scheds:
        plan = evaluate_schedule(s, W, profile=prof, devices=f"{s.num_gpus}xcpu")
        plans.append(dataclasses.replace(plan, estimate=dataclasses.replace(plan.estimate, kv_tokens=200.0)))
    reps = run_plans(plans, "tiny", num_requests=30, seed=5, log_decisions=True, keep_tokens=True)
    ref = {r.id: r.tokens for r in reps[-1].requests}
    for plan, rep in zip(plans[:-1], reps):
        sim = run_simulated(plan, prof, num_requests=30, seed=5, log_decisions=True)
        assert rep.num_finished == sim.num_finished == 30 and rep.num_ranks == 2
        assert rep.decisions and rep.decisions == sim.decisions
        assert {r.id: r.tokens for r in rep.requests} == ref
    modes = {"sp=True" in d for d in reps[0].decisions if "Decode" in d or "Chunk" in d}
    assert modes == {True, False}


def test_pipeinfer_decides_alike_decodes_greedily_and_cancels():
    """PipeInfer and synchronous speculation on two target stages and a drafter (three gloo ranks), draft lengths
    1 to 8, tree widths 1 to 3: the simulated engine's driver decisions; every request's tokens the target's greedy
    tokens; with a drafter the target mostly rejects (a one-layer self-draft of a random model), runs cancelled in
    flight and their KV rolled back on every stage; with the target as its own drafter, every draft accepted; with
    trees of that one-layer drafter, siblings (its next choices for the first token) rescue rejected tokens, and
    the row copies that bring their rows up to date run on every stage (all of them where nothing is cancelled)."""
    from exegpt.policies.pipeinfer import PipeInferSchedule
    from runner.generate import greedy_reference
    from runner.requests import make_requests
    from runner.run import run_plans
    from runner.weights import load_model

    torch.set_num_threads(1)
    prof = Profile.load(PROFILE)
    w, n, seed = Workload.truncated_normal(input=(24, 10, 48), output=(20, 8, 40)), 3, 3
    scheds = [PipeInferSchedule("sync", 2, 3, n_draft=1, draft="layers:1"),
              PipeInferSchedule("pipeinfer", 2, 3, n_draft=8, depth=2, draft="layers:1", link_delay_s=0.002),
              PipeInferSchedule("pipeinfer", 2, 3, n_draft=4, cutoff=0.02, depth=2, draft="model:tiny"),
              PipeInferSchedule("sync", 2, 3, n_draft=3, draft="layers:1", width=3),
              PipeInferSchedule("pipeinfer", 2, 3, n_draft=4, depth=2, draft="layers:1", width=2, link_delay_s=0.002)]
    plans = [evaluate_schedule(s, w, profile=prof, devices="3xcpu") for s in scheds]
    reps = run_plans(plans, "tiny", num_requests=n, seed=seed, keep_tokens=True, log_decisions=True)
    model, args, _ = load_model("tiny", seed=seed)
    ref = {r.id: tuple(greedy_reference(model, list(r.prompt), r.output_len))
           for r in make_requests(w, n, args.vocab_size, seed)}
    for s, plan, rep in zip(scheds, plans, reps):
        sp = rep.speculation
        sim = run_simulated(plan, prof, num_requests=n, seed=seed, log_decisions=True)
        assert rep.num_finished == sim.num_finished == n and rep.decisions == sim.decisions
        assert {r.id: r.tokens for r in rep.requests} == ref, (s, sp)
        assert 0 <= sp["accepted"] <= sp["verified"] <= sp["drafted"] and sp["runs"] >= sp["spec_runs"] > 0
    rejecting = reps[1].speculation
    assert rejecting["cancelled"] > 0 and rejecting["acceptance"] < 0.9
    assert all(st["rolled_back"] > 0 for st in rejecting["stages"])  # rejected KV reset on every stage
    later = rejecting["stages"][1]  # every run reaches it: computed, skipped, or stopped mid-way (timing decides)
    assert later["runs"] + later["skipped"] + later["aborted"] == rejecting["runs"] + n
    assert reps[2].speculation["acceptance"] == 1.0 and reps[0].speculation["cancelled"] == 0
    sync_tree, tree = reps[3].speculation, reps[4].speculation
    assert sync_tree["rescued"] > 0 and sync_tree["tree_runs"] == sync_tree["spec_runs"]
    assert sync_tree["cancelled"] == 0 and all(st["copies"] == sync_tree["copies"] > 0 for st in sync_tree["stages"])
    assert tree["tree_runs"] > 0 and tree["cancelled"] > 0 and all(st["rolled_back"] > 0 for st in tree["stages"])
    assert tree["stages"][0]["copies"] == tree["copies"] >= tree["stages"][1]["copies"]
    later = tree["stages"][1]
    assert later["runs"] + later["skipped"] + later["aborted"] == tree["runs"] + n
