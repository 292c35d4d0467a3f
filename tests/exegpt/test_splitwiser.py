"""Splitwiser on the simulated engine: its knobs refuse bad values in one line, every request is accounted for,
the measured interference prices its steps, and the optimizer searches it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from exegpt import Profile, Workload, evaluate_schedule, find_schedule, run_simulated
from exegpt.errors import ExeGPTError
from exegpt.interference import PhaseInterference, PhasePair
from exegpt.policies import describe
from exegpt.policies.splitwiser import SplitwiserSchedule, threads
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
