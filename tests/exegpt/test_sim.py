"""The simulated engine: it runs the runner's drivers, and on fixed lengths it equals the estimate."""

from __future__ import annotations

import math

import numpy as np
import pytest

from exegpt import Policy, RRASchedule, StaticSchedule, WAASchedule, Workload, evaluate_schedule, static_schedule
from exegpt.distribution import Distribution
from exegpt.errors import ExeGPTError
from exegpt.sim import run_simulated

from .conftest import make_profile


def fixed(prompt: int, output: int) -> Workload:
    return Workload(Distribution.from_pmf([prompt], [1.0]), Distribution.from_pmf([output], [1.0]), name="fixed")


@pytest.mark.parametrize("encode_batch,decode_iters", [(4, 4), (8, 2), (3, 16), (5, 8)])
def test_fixed_lengths_sim_equals_the_estimate(encode_batch, decode_iters):
    # Every query runs 16 decode iterations (17 tokens, the prefill's first): with N_D dividing 16 every phase runs
    # N_D iterations of a full refill batch and exactly B_E queries finish a phase. The synthetic profile is affine
    # in context, so a step at each iteration's own context averages to the estimate's step at the mean context:
    # throughput (the steady window) and the worst latency equal the estimate's.
    prof = make_profile()
    plan = evaluate_schedule(RRASchedule(encode_batch, decode_iters, 1, 0, 1), fixed(48, 17), profile=prof,
                             model="opt-13b", devices="1xA40")
    r = run_simulated(plan, prof, num_requests=40 * encode_batch)
    e = plan.estimate
    assert r.decode_batch == e.decode_batch == encode_batch * 16 / decode_iters
    assert r.throughput_seq_s == pytest.approx(e.throughput_seq_s, rel=1e-9)
    assert r.latency_s == pytest.approx(e.latency_s, rel=1e-9)
    assert r.encode_stage_s == pytest.approx(e.encode_stage_s, rel=1e-9)
    assert r.decode_step_s == pytest.approx(e.decode_step_s, rel=1e-9)
    assert r.latency_len == 17 and r.num_requests == 40 * encode_batch


def test_varied_lengths_worst_latency_exceeds_the_expected_one():
    # Mixed prompts and outputs: the worst bound-length request waits through longer phases than the expectation,
    # its median sits near it; the simulated run's mean decode batch is the estimate's within a few percent.
    prof = make_profile()
    w = Workload.truncated_normal(input=(64, 60, 128), output=(32, 13, 80))
    plan = evaluate_schedule(RRASchedule(4, 4, 1, 0, 1), w, profile=prof, model="opt-13b", devices="1xA40")
    r = run_simulated(plan, prof, num_requests=800, seed=1)
    assert r.latency_s > r.latency_p50_s
    assert r.latency_s > plan.estimate.latency_s
    assert r.decode_batch == pytest.approx(plan.estimate.decode_batch, rel=0.05)
    assert math.isfinite(r.throughput_seq_s) and r.makespan_s > 0
    # The same seed draws the same requests: the simulated run is deterministic.
    assert run_simulated(plan, prof, num_requests=800, seed=1) == r


def test_pipeline_sim_runs_every_request():
    prof = make_profile()
    w = Workload.truncated_normal(input=(64, 30, 128), output=(24, 10, 60))
    plan = evaluate_schedule(RRASchedule(8, 4, 1, 0, 4), w, profile=prof, model="opt-13b", devices="4xA40")
    r = run_simulated(plan, prof, num_requests=300)
    assert r.num_requests == 300 and r.decode_batch > 0
    # A pipeline of 4 stages pays fill and drain in each encode phase: slower per phase than one stage's share.
    assert r.encode_stage_s > 0 and r.latency_s >= r.latency_p50_s


@pytest.mark.parametrize("schedule", [WAASchedule(Policy.WAA_C, 4, 16, 1, 0, 1, 1),
                                      WAASchedule(Policy.WAA_C, 2, 64, 1, 0, 1, 1),
                                      WAASchedule(Policy.WAA_M, 8, 32, 1, 0, 2, 2)])
def test_fixed_lengths_waa_sim_equals_the_estimate(schedule):
    # One batch joins per decode iteration and every row stays 16 of them: the decode batch is exactly B_E * 16 and
    # the steady throughput B_E per period (up to one batch at the window's edges). The decoder is the bottleneck,
    # so the encoder runs HANDOFF_DEPTH batches ahead of the merges and a batch waits that many periods from its
    # encode start to its merge: the simulated run's worst latency is the estimate's.
    prof = make_profile(handoff_on_compute=True)
    plan = evaluate_schedule(schedule, fixed(48, 17), profile=prof, model="opt-13b",
                             devices=f"{schedule.num_gpus}xA40")
    r = run_simulated(plan, prof, num_requests=100 * schedule.encode_batch)
    e = plan.estimate
    assert r.decode_batch == e.decode_batch == 16 * schedule.encode_batch
    assert r.decode_step_s == pytest.approx(e.decode_step_s, rel=1e-9)
    assert r.throughput_seq_s == pytest.approx(e.throughput_seq_s, rel=0.02)
    assert r.latency_s == pytest.approx(e.latency_s, rel=1e-9)
    assert r.latency_p50_s <= r.latency_s


@pytest.mark.parametrize("batch,devices", [(8, "1xA40"), (16, "4xA40")])
def test_fixed_lengths_static_sim_equals_the_estimate(batch, devices):
    # Every row of a batch runs to its end together: the latency of the longest output is the estimate's, and so is
    # the mean decode step (the context grows by one a step, and the profile is affine in context).
    prof = make_profile()
    plan = static_schedule(fixed(48, 17), math.inf, profile=prof, model="opt-13b", devices=devices)
    assert plan.schedule.batch >= 1
    plan = evaluate_schedule(StaticSchedule(batch, 1, plan.schedule.num_gpus), fixed(48, 17), profile=prof,
                             model="opt-13b", devices=devices)
    r = run_simulated(plan, prof, num_requests=50 * batch)
    e = plan.estimate
    assert r.decode_batch == e.decode_batch == batch
    assert r.latency_s == pytest.approx(e.latency_s, rel=1e-9)
    assert r.decode_step_s == pytest.approx(e.decode_step_s, rel=1e-9)
    assert r.encode_stage_s == pytest.approx(e.encode_stage_s, rel=1e-9)
    # Completions come a batch at a time: the 10 %-90 % window holds whole batches give or take one.
    assert r.throughput_seq_s == pytest.approx(e.throughput_seq_s, rel=0.05)


def test_bad_input_is_named():
    prof = make_profile()
    w = Workload.truncated_normal(input=(64, 30, 128), output=(24, 10, 60))
    plan = evaluate_schedule(RRASchedule(4, 4, 1, 0, 1), w, profile=prof, model="opt-13b", devices="1xA40")
    with pytest.raises(ExeGPTError, match=r"number of requests 0 must be a whole number in \[1, 1,000,000\]"):
        run_simulated(plan, prof, num_requests=0)
    with pytest.raises(ExeGPTError, match=r"lengths must be \(input, output\) pairs .* least value 0"):
        run_simulated(plan, prof, lengths=np.array([[4, 3], [0, 2]]))
    with pytest.raises(ExeGPTError, match="every one of the 2 requests exceeds the plan's KV-cache budget of 188 "
                                          "tokens .* the shortest has 189"):
        run_simulated(plan, prof, lengths=np.array([[128, 61], [129, 60]]))


def test_requests_over_the_cache_budget_fail_and_the_rest_run_in_order():
    """As the runner's admission: a request longer than the plan's KV-cache budget (longest prompt plus longest
    output) is failed, and the timeline is the simulated run of the others alone."""
    prof = make_profile()
    w = Workload.truncated_normal(input=(64, 30, 128), output=(24, 10, 60))
    plan = evaluate_schedule(RRASchedule(4, 4, 1, 0, 1), w, profile=prof, model="opt-13b", devices="1xA40")
    rng = np.random.default_rng(3)
    ok = np.stack([rng.integers(1, 129, 80), rng.integers(1, 61, 80)], axis=1)
    mixed = np.insert(ok, [5, 40, 40], [[128, 61], [200, 1], [128, 60]], axis=0)  # the last one fits exactly
    r = run_simulated(plan, prof, lengths=mixed)
    alone = run_simulated(plan, prof, lengths=np.insert(ok, 40, [128, 60], axis=0))
    assert (r.num_requests, r.num_failed, alone.num_failed) == (83, 2, 0)
    failed = [q for q in r.requests if q.status == "failed"]
    assert [q.id for q in failed] == [5, 41] and all("KV-cache budget of 188" in q.reason for q in failed)
    # The others ran exactly as alone: same completions and timings, in the same order.
    kept = [q for q in r.requests if q.status != "failed"]
    assert [(q.input_len, q.output_len, q.finish_s) for q in kept] == \
        [(q.input_len, q.output_len, q.finish_s) for q in alone.requests]
    fields = ("throughput_seq_s", "latency_s", "encode_stage_s", "decode_step_s", "decode_batch", "makespan_s")
    assert all(getattr(r, f) == getattr(alone, f) for f in fields)


def test_a_flood_of_20000_requests_loses_none():
    """20,000 requests at once: each finished exactly once (``python -m benchmarks.floods`` measures the memory
    this takes against a tenth of the load, on this engine and on the runner)."""
    from exegpt import find_schedule

    plan = find_schedule(Workload.task("S"), 20.0, devices="1xA100", policies=["rra"])
    rep = run_simulated(plan, num_requests=20_000)
    assert rep.num_finished == 20_000 and rep.num_failed == 0
    assert sorted(r.id for r in rep.requests) == list(range(20_000))
