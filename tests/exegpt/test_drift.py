"""Drift on the simulated engine: the monitor detects a shift of the output lengths halfway through a run, the
cheap move keeps the bound the old plan breaks (+15 %) or gains throughput under it (-30 %), no request is lost,
and a run without a shift raises no alarm."""

from __future__ import annotations

import numpy as np
import pytest

from exegpt import ExeGPTError, Policy, RRASchedule, RunReport, StaticSchedule, WAASchedule, Workload, \
    evaluate_schedule, run_simulated
from exegpt.drift import DriftMonitor, MonitorOptions, segment
from exegpt.replan import DriftOptions, cheap_move, in_force, rescaled

from .conftest import tiny_cpu_profile

W = Workload.truncated_normal(input=(24, 8, 48), output=(32, 4, 64))
HALF = 300
BOUND_S = 0.0681  # twice the smallest bound RRA meets for W on one CPU rank (the tiny profile), where
# find_schedule picks B_E=36, N_D=41


def shifted(factor: float, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """HALF requests of W, then HALF with every output length times ``factor``; and each request's bound length
    (the p99 output length of the distribution it came from)."""
    rng = np.random.default_rng(seed)
    w2 = Workload(W.input_len, rescaled(W.output_len, factor, W.output_len.max))
    pairs = np.concatenate([W.sample(HALF, rng, joint=False), w2.sample(HALF, rng, joint=False)])
    return pairs, np.repeat([W.output_len.quantile(0.99), w2.output_len.quantile(0.99)], HALF)


@pytest.mark.parametrize("bad,message", [
    (dict(window=16, min_samples=32), "window=16 is smaller than min_samples=32"),
    (dict(alpha=0.0), "alpha=0.0 must be in (0, 1)"), (dict(alpha=1.5), "alpha=1.5 must be in (0, 1)"),
    (dict(min_samples=4), "min_samples=4 is below the 8 requests"), (dict(test="t"), "test='t' must be one of"),
    (dict(test="ad", alpha=0.01), "p-values stop at 0.001")])
def test_bad_monitor_options_get_one_line(bad, message):
    with pytest.raises(ExeGPTError) as e:
        MonitorOptions(**bad)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("lengths,message", [((0, 5), "input_len=0 of request 0"), ((5, -3), "output_len=-3"),
                                             ((5, 2.5), "output_len=2.5")])
def test_bad_lengths_get_one_line(lengths, message):
    with pytest.raises(ExeGPTError) as e:
        DriftMonitor(W).observe(0, *lengths)
    assert message in str(e.value) and "whole number of tokens >= 1" in str(e.value) and "\n" not in str(e.value)


def test_the_monitor_reads_admission_order_and_keeps_its_false_alarm_rate():
    m = DriftMonitor(W, MonitorOptions(window=64, min_samples=32, step=8))
    rng = np.random.default_rng(7)
    x = W.sample(3000, rng, joint=False)
    # Finished out of order (the shortest outputs first within each batch of 40): nothing enters the window
    # until every earlier request has, so the short ones alone never make a sample.
    for lo in range(0, 3000, 40):
        order = lo + np.argsort(x[lo:lo + 40, 1], kind="stable")
        for i in order:
            assert m.observe(int(i), int(x[i, 0]), int(x[i, 1])) is None
        assert m.observed == lo + 40
    with pytest.raises(ExeGPTError, match="position 5 was observed already"):
        m.observe(5, 3, 3)
    # 3000 requests at most alpha * 3000 / window = 0.47 false alarms expected: none here, and p-values spread.
    assert min(m.p_values()) > m.options.test_level


def test_drift_is_detected_and_replanned_on_the_simulated_engine():
    prof = tiny_cpu_profile()
    plan = evaluate_schedule(RRASchedule(36, 41, 1, 0, 1), W, BOUND_S, profile=prof, devices="1xcpu")
    assert plan.estimate.latency_s <= BOUND_S
    control, _ = shifted(1.0)
    rep = run_simulated(plan, prof, lengths=control, drift=DriftOptions(profile=prof))
    assert rep.drift == () and rep.num_finished == 2 * HALF  # no shift: no alarm
    after = {}
    for factor in (1.15, 0.7):
        pairs, lens = shifted(factor)
        runs = {replan: run_simulated(plan, prof, lengths=pairs, latency_lens=lens,
                                      drift=DriftOptions(profile=prof, replan=replan, full_replan=factor < 1,
                                                         latency_margin=0.03))
                for replan in (False, True)}
        for rep in runs.values():
            assert rep.num_finished == 2 * HALF and rep.num_failed == 0  # no request lost
        drift, refit = runs[True].drift
        assert drift.kind == "drift" and refit.kind == "refit" and drift.marginal == "output"
        assert 0 < drift.observed - HALF <= 64 and abs(drift.change_at - HALF) <= 5
        assert abs(drift.output_ratio - factor) < 0.05 and drift.input_ratio == 1.0
        assert drift.move_s < 1.0 and drift.applied_s == drift.detected_s
        assert drift.after != drift.before and drift.new_keeps_bound
        assert runs[False].drift[0].observed == drift.observed and runs[False].drift[0].after == ""
        # The requests admitted after the move, on each run: the same requests, their own bound length.
        first = min(r.id for r in runs[True].requests if r.encode_start_s >= drift.applied_s)
        after[factor] = {k: segment(r.requests, range(first, 2 * HALF)) for k, r in runs.items()}
        if factor > 1:  # the old plan breaks the bound, estimated and simulated; the cheap move keeps it
            assert not drift.old_keeps_bound and after[factor][False].latency_s > 1.2 * BOUND_S
            assert after[factor][True].latency_s <= BOUND_S
        else:  # the old plan keeps it with room to spare; the move spends the room on throughput
            assert drift.old_keeps_bound and drift.new_throughput_seq_s > 1.2 * drift.old_throughput_seq_s
            assert after[factor][False].latency_s < 0.8 * BOUND_S and after[factor][True].latency_s <= BOUND_S
            assert after[factor][True].throughput_seq_s > 1.2 * after[factor][False].throughput_seq_s
            assert drift.full_s < 1.0 and drift.full_gain > 1.0  # a batch bigger than the cache holds: a redeploy adds
    rep = runs[True]
    assert RunReport.from_json(rep.to_json()).drift == rep.drift


def test_waa_retunes_its_micro_batch_and_a_policy_without_a_cheap_move_says_so():
    prof = tiny_cpu_profile()
    plan = evaluate_schedule(WAASchedule(Policy.WAA_C, 3, 8, 1, 0, 1, 1), W, 3 * BOUND_S, profile=prof,
                             devices="2xcpu")
    pairs, _ = shifted(1.15)
    rep = run_simulated(plan, prof, lengths=pairs, drift=DriftOptions(profile=prof, full_replan=False))
    assert rep.num_finished == 2 * HALF
    drift = rep.drift[0]
    assert drift.kind == "drift" and 0 < drift.observed - HALF <= 64 and drift.applied_s == drift.detected_s
    w2 = Workload(W.input_len, rescaled(W.output_len, drift.output_ratio, W.output_len.max))
    moved = cheap_move(plan, w2, prof)
    assert drift.after == f"WAA-C B_E=3 B_m={moved.schedule.micro_batch} TP1x0 1+1" and moved.stages == plan.stages
    assert moved.schedule.micro_batch != 8 and moved.estimate.throughput_seq_s >= in_force(plan, w2, prof)[0]
    # -30 % under the B_m tuned for W, which keeps the bound: a move that adds less than min_gain is found,
    # reported and not taken.
    tuned = cheap_move(plan, W, prof)
    assert tuned.slo_check.holds and plan.estimate.latency_s > 3 * BOUND_S  # B_m = 8 broke it
    pairs, _ = shifted(0.7)
    rep = run_simulated(tuned, prof, lengths=pairs, drift=DriftOptions(profile=prof, full_replan=False, min_gain=9.0))
    kept = rep.drift[0]
    assert kept.old_keeps_bound and kept.after == "" and kept.new_throughput_seq_s > 0 and np.isnan(kept.applied_s)
    static = evaluate_schedule(StaticSchedule(8, 1, 1), W, profile=prof, devices="1xcpu")
    with pytest.raises(ExeGPTError, match="policy static has no drift re-planning; the policies with a cheap move "
                                          "are rra, waa_c, waa_m"):
        run_simulated(static, prof, num_requests=20, drift=DriftOptions(profile=prof))
