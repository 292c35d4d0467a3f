"""Splitwiser on the simulated engine: its knobs refuse bad values in one line, every request is accounted for,
the measured interference prices its steps, and the optimizer searches it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from exegpt import Profile, Workload, evaluate_schedule, find_schedule, run_simulated
from exegpt.errors import ExeGPTError
from exegpt.interference import PhaseInterference, PhasePair
from exegpt.policies import describe, splitwiser
from exegpt.policies.splitwiser import SplitwiserSchedule, threads
from exegpt.problem import problem
from exegpt.report import FINISHED

PROFILE = Path(__file__).resolve().parents[1] / "data" / "tiny-cpu.json"
W = Workload.truncated_normal(input=(24, 10, 48), output=(16, 8, 40))


def with_interference(prof: Profile, kappa: float) -> Profile:
    """The profile with a phase-interference table: each phase on one thread as fast as the tables, ``kappa``
    slower beside the other."""
    b = (1, 4, 16)
    base = (1e-3, 2e-3, 4e-3)
    slow = tuple(x * (1 + kappa) for x in base)
    pair = PhasePair(1, 1, base, base, slow, slow)
    inter = PhaseInterference(2, 1, 24, 40, b, base, base, (pair,))
    return dataclasses.replace(prof, phase_interference=inter)


@pytest.mark.parametrize("fields,match", [
    (dict(prefill_share=150), r"prefill_share=150 must be a percent of the device in 1\.\.100 \(more would exceed"),
    (dict(decode_share=0), r"decode_share=0 must be a percent"),
    (dict(processes=0), r"processes=0; it runs exactly 2 processes"),
    (dict(max_num_seqs=0), r"max_num_seqs=0 must be a whole number >= 1")])
def test_bad_knobs_get_one_line(fields, match):
    with pytest.raises(ExeGPTError, match=match) as e:
        SplitwiserSchedule(**{"max_num_seqs": 8, "max_prefill_tokens": 96, **fields})
    assert "\n" not in str(e.value)


def test_a_hand_off_larger_than_the_decode_cache_is_refused():
    prof = Profile.load(PROFILE)
    plan = evaluate_schedule(SplitwiserSchedule(8, 96, block_size=8), W, profile=prof, devices="1xcpu")
    small = dataclasses.replace(plan, estimate=dataclasses.replace(plan.estimate, kv_tokens=64.0))
    with pytest.raises(ExeGPTError, match=r"KV hand-off of up to 96 prompt tokens .* needs 20 blocks of 8 tokens; "
                                          r"the decode process's cache holds 8") as e:
        run_simulated(small, prof, num_requests=10)
    assert "\n" not in str(e.value)


def test_interference_slows_the_simulated_run_and_every_request_is_accounted_for():
    prof = Profile.load(PROFILE)
    reps = {}
    for kappa in (0.0, 1.0):
        p = with_interference(prof, kappa)
        p = Profile.from_dict(p.to_dict())  # the table survives the profile's JSON
        assert p.phase_interference.factors(1, 1, "decode", 4) == pytest.approx((1.0, kappa))
        plan = evaluate_schedule(SplitwiserSchedule(8, 96, block_size=8), W, profile=p, devices="1xcpu")
        reps[kappa] = (plan, run_simulated(plan, p, num_requests=60, seed=2, log_decisions=True))
    for plan, rep in reps.values():
        assert rep.num_finished == 60 and all(r.status == FINISHED for r in rep.requests)
        assert sum(r.num_generated for r in rep.requests) == sum(r.output_len for r in rep.requests)
        assert any(d.startswith("encode Prefill") for d in rep.decisions)
        assert any(d.startswith("decode Merge") for d in rep.decisions)
    # Twice as slow while both compute: slower, but less than twice (the phases do not always overlap).
    (p0, r0), (p1, r1) = reps[0.0], reps[1.0]
    assert 1.05 < r0.throughput_seq_s / r1.throughput_seq_s < 2.0
    assert 1.05 < p0.estimate.throughput_seq_s / p1.estimate.throughput_seq_s <= 2.0


def test_shares_become_threads_and_the_optimizer_searches_the_policy():
    assert [threads(s, 2) for s in (25, 50, 75, 100)] == [1, 1, 2, 2]
    assert threads(50, 16) == 8
    plan = find_schedule(W, 1.0, profile=Profile.load(PROFILE), devices="1xcpu", policies=["splitwiser"])
    assert isinstance(plan.schedule, SplitwiserSchedule) and plan.estimate.throughput_seq_s > 0
    assert describe(plan.schedule).startswith("splitwiser S=")
    assert [s.role for s in plan.stages] == ["encode", "decode"]
    # In the default portfolio where a plan has one device at TP 1, and only there.
    searched = dict(find_schedule(W, 1.0, profile=Profile.load(PROFILE), devices="1xcpu",
                                  per_policy=True).search.per_policy)
    assert searched["splitwiser"] > 0 and set(searched) >= {"rra", "cb", "chunked", "splitwiser"}
    assert splitwiser.candidates(problem(W, 1.0, profile=Profile.load(PROFILE), devices="1xcpu"), [1], 4)
    assert not splitwiser.candidates(problem(W, 1.0, profile=Profile.load(PROFILE), devices="2xcpu"), [1], 4)
    assert not splitwiser.candidates(problem(W, 1.0, profile=Profile.load(PROFILE), devices="1xcpu"), [2], 4)


def test_on_one_gpu_the_phases_share_its_compute_and_bandwidth():
    """Without a measured table, a GPU's two processes split one device (``exegpt.share_roofline``): a half share
    halves a prefill's compute and barely touches a memory-bound decode; a decode beside a prefill slows only by
    the bandwidth they draw together; and one device never serves more than disaggregation on two of them."""
    from exegpt.devices import get_device
    from exegpt.models import get_model
    from exegpt.share_roofline import share_factors, step_work

    m, d = get_model("llama-2-7b"), get_device("A100")
    pre, dec = step_work(m, d, "prefill", 4, 512, 600), step_work(m, d, "decode", 32, 512, 600)
    assert pre.compute_s > 4 * pre.memory_s and dec.memory_s > 4 * dec.compute_s
    assert share_factors(pre, 0.5, dec, 0.5) == pytest.approx((2.0, 0.0))  # its half of the SMs, no slicing
    assert share_factors(dec, 0.5, pre, 0.5)[0] == pytest.approx(1.0)  # half the SMs saturate HBM
    assert share_factors(pre, 1.0, dec, 1.0) == pytest.approx((1.0, 1.0))  # 200 %: the SMs time-sliced
    kd = share_factors(dec, 1.0, pre, 1.0)[1]
    assert kd == pytest.approx(pre.demand(0.5))  # stretched by the bandwidth the prefill draws beside it
    w = Workload.task("S")
    plans = {p: find_schedule(w, 60.0, model="llama-2-7b", devices=dev, policies=[p])
             for p, dev in (("splitwiser", "1xA100"), ("disagg", "2xA100"))}
    thr = {p: run_simulated(plan, num_requests=200).throughput_seq_s for p, plan in plans.items()}
    assert thr["splitwiser"] < 0.9 * thr["disagg"]
