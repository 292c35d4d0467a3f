"""Requests that arrive over time, and the SLO forms users state (``exegpt.arrivals``, ``exegpt.slo``,
``exegpt.search.goodput``), on the simulated engine."""

from __future__ import annotations

import math

import numpy as np
import pytest

from exegpt import (Arrivals, CompletionSLO, InfeasibleBoundError, LatencyBound, Plan, RequestSLO, RRASchedule,
                    SearchSpace, Workload, evaluate_schedule, find_schedule, request_stream, run_simulated)
from exegpt.__main__ import main
from exegpt.errors import ExeGPTError
from exegpt.policies.cb import CBSchedule
from exegpt.policies.chunked import ChunkedSchedule
from exegpt.policies.disagg import DisaggSchedule
from exegpt.problem import problem
from exegpt.search.goodput import SimulatedSearch, goodput
from exegpt.search.optimize import simulated_candidates

from .conftest import make_profile

W = Workload.truncated_normal(input=(64, 30, 128), output=(24, 10, 60))
TRACE = Workload.from_pairs([(20 + i % 40, 5 + i % 13) for i in range(60)],
                            arrivals_s=[3.0 + 0.5 * i + (0.2 if i % 7 == 0 else 0.0) for i in range(60)])


def test_request_streams():
    s = request_stream(W, 50, seed=4)
    assert s.lengths.shape == (50, 2) and (s.arrival_s == 0).all()
    p = request_stream(W, 50, seed=4, arrivals=Arrivals.poisson(10.0))
    # The lengths are those of the saturated stream; only the arrival times differ.
    assert (p.lengths == s.lengths).all() and p.arrival_s[0] == 0 and (np.diff(p.arrival_s) > 0).all()
    assert 2.0 < p.arrival_s[-1] < 10.0  # 49 gaps of 0.1 s on average
    t = request_stream(TRACE, 60, arrivals=Arrivals.trace(speedup=2.0))
    # The trace's requests in its order, its gaps halved, from zero.
    assert [tuple(x) for x in t.lengths] == list(TRACE.pairs)
    assert TRACE.arrivals_s[0] == 0 and t.arrival_s == pytest.approx(np.asarray(TRACE.arrivals_s) / 2.0)


def test_a_traces_timestamps_are_replayed_in_order():
    prof = make_profile()
    plan = evaluate_schedule(RRASchedule(4, 4, 1, 0, 1), TRACE, profile=prof, model="opt-13b", devices="1xA40")
    rep = run_simulated(plan, prof, num_requests=60, arrivals=Arrivals.trace(speedup=4.0))
    assert rep.num_finished == 60
    starts = [r.encode_start_s for r in rep.requests]
    assert all(r.encode_start_s >= r.arrival_s for r in rep.requests)
    assert starts == sorted(starts)  # admitted in arrival order
    # The engine idles between sparse arrivals: the run lasts as long as the (sped-up) trace.
    assert rep.makespan_s >= rep.requests[-1].arrival_s


@pytest.mark.parametrize("make, message", [
    (lambda: Arrivals.poisson(0.0), "arrival rate 0.0 requests/s must be a finite number > 0"),
    (lambda: Arrivals.parse("poisson:-2"), "arrival rate -2.0 requests/s must be a finite number > 0"),
    (lambda: Arrivals.parse("burst"), "arrivals 'burst' not understood; expected all, poisson:RATE"),
    (lambda: request_stream(W, 10, arrivals=Arrivals.trace()), "has no timestamps to replay"),
    (lambda: request_stream(TRACE, 61, arrivals=Arrivals.trace()), "has 60 requests; 61 were asked"),
    (lambda: LatencyBound(3.0, 1.5), "length quantile 1.5 must be in (0, 1]"),
    (lambda: CompletionSLO(3.0, 1.0), "share 1.0 of requests must be in (0, 1)"),
    (lambda: RequestSLO(0.0, 0.1), "TTFT bound 0.0 must be a number of seconds > 0"),
    (lambda: RequestSLO(1.0, -0.1), "TPOT bound -0.1 must be a number of seconds > 0"),
    (lambda: RequestSLO(1.0, 0.1, 100), "percentile 100 must be in (0, 100)"),
    (lambda: find_schedule(W, 3.0, policies=["fifo"]), "unknown policy: 'fifo'"),
    (lambda: find_schedule(W, CompletionSLO(3.0), verify_requests=10), "verify_requests apply to a latency bound"),
    (lambda: SimulatedSearch(num_requests=0), "num_requests=0 must be a whole number >= 1"),
    (lambda: SimulatedSearch(arrivals="burst"), "arrivals='burst' must be 'poisson' or 'trace'"),
    (lambda: CBSchedule(0, 64, 1, 0, 1), "continuous batching: max_num_seqs=0 must be a whole number >= 1"),
    (lambda: ChunkedSchedule(8, 8, 1, 0, 1), "token_budget=8 must exceed max_num_seqs=8, or a step full of decodes"),
    (lambda: evaluate_schedule(CBSchedule(4, 100, 1, 0, 1), W, profile=make_profile(), devices="1xA40"),
     "max_num_batched_tokens=100 is below the workload's longest request (188 tokens)"),
    (lambda: evaluate_schedule(CBSchedule(4, 512, 1, 0, 1, block_size=24), W, profile=make_profile(),
                               devices="1xA40"), "block_size=24 does not divide opt-13b's context of 2048 tokens"),
    (lambda: DisaggSchedule(8, 256, 2, 0), "decode_gpus=0 leaves the decode pool empty; each pool needs >= 1 device"),
    (lambda: DisaggSchedule(8, 256, 3, 1, prefill_tp=2), "prefill_tp=2 does not divide the prefill pool's 3 devices"),
    (lambda: DisaggSchedule(0, 256, 1, 1), "disaggregation: max_num_seqs=0 must be a whole number >= 1"),
    (lambda: evaluate_schedule(DisaggSchedule(8, 100, 1, 1), W, profile=make_profile(), devices="2xA40"),
     "max_prefill_tokens=100 is below the workload's longest prompt (128 tokens)"),
    (lambda: evaluate_schedule(DisaggSchedule(8, 512, 1, 1, block_size=48), W, profile=make_profile(),
                               devices="2xA40"), "block_size=48 does not divide opt-13b's context of 2048 tokens"),
])
def test_bad_input_is_one_clear_line(make, message):
    with pytest.raises(ExeGPTError) as e:
        make()
    assert message in str(e.value) and "\n" not in str(e.value)


def test_completion_slo_picks_the_best_simulated_schedule_of_its_grid():
    """Form (b): the pick keeps the bound on its simulated run and no grid candidate that keeps it runs faster
    (every candidate simulated, against the search's pruning)."""
    prof = make_profile()
    slo, space = CompletionSLO(1.5, 0.9), SearchSpace(max_encode_batch=16, max_micro_batch=16)
    opts = SimulatedSearch(num_requests=150, grid_points=4, max_simulated=100)
    plan = find_schedule(W, slo, profile=prof, devices="1xA40", space=space, simulated=opts,
                         policies=["rra", "cb", "chunked"])
    c = plan.slo_check
    assert c.form == "completion" and c.holds and 0 <= c.margin < 1 and c.engine == "simulated"
    rep = run_simulated(plan, prof, num_requests=150)
    assert slo.holds(rep) and c.achieved == (slo.achieved(rep),)
    prob = problem(W, math.inf, profile=prof, devices="1xA40")
    best, policies = 0.0, set()
    for _, policy, make_plan in simulated_candidates(prob, ("rra", "cb", "chunked"), None, space, None, 4):
        r = run_simulated(make_plan(None), prof, num_requests=150)
        policies.add(policy)
        if slo.holds(r):
            best = max(best, r.throughput_seq_s)
    assert rep.throughput_seq_s == best and policies == {"rra", "cb", "chunked"}
    # The plan says which policies were searched and the best each reached.
    reached = dict(plan.search.per_policy)
    assert set(reached) == {"rra", "cb", "chunked"}
    assert reached[plan.schedule.policy.value] == best == max(reached.values())
    assert Plan.from_json(plan.to_json()) == plan


def test_request_slo_maximises_goodput():
    """Form (c): the plan's goodput keeps the SLO when simulated again, a rate 1.5x higher does not, and the plan
    records the percentiles it reached."""
    prof = make_profile()
    slo = RequestSLO(ttft_s=1.0, tpot_s=0.05, percentile=90)
    opts = SimulatedSearch(num_requests=200)
    plan = find_schedule(W, slo, profile=prof, devices="2xA40", simulated=opts)
    c = plan.slo_check
    assert c.form == "request" and c.holds and c.goodput_rps > 0 and len(c.achieved) == 2
    # Each run serves enough requests for its arrivals to span 10 TTFT bounds (and at least 200).
    at = run_simulated(plan, prof, c.num_requests, arrivals=Arrivals.poisson(c.goodput_rps))
    assert c.num_requests == max(200, math.ceil(10 * c.goodput_rps * 1.0))
    above = run_simulated(plan, prof, math.ceil(15 * c.goodput_rps), arrivals=Arrivals.poisson(1.5 * c.goodput_rps))
    assert slo.holds(at) and not slo.holds(above)
    assert slo.achieved(at) == c.achieved and slo.attainment(at.requests) >= 0.9
    assert goodput(plan, slo, prof, opts)[0] == c.goodput_rps  # deterministic
    assert {"rra", "waa_c", "cb", "chunked", "disagg"} <= set(dict(plan.search.per_policy))


def test_goodput_on_a_traces_own_timestamps():
    """Form (c) with the trace's timestamps: the rate is the trace's mean rate times the speed-up found, and the
    SLO holds on the trace replayed at that speed."""
    prof = make_profile()
    slo = RequestSLO(ttft_s=0.5, tpot_s=0.05)
    opts = SimulatedSearch(num_requests=60, arrivals="trace", max_simulated=3)
    plan = find_schedule(TRACE, slo, profile=prof, devices="1xA40", policies=["rra"], simulated=opts)
    rate = plan.slo_check.goodput_rps
    base = 59 / (TRACE.arrivals_s[-1] - TRACE.arrivals_s[0])
    rep = run_simulated(plan, prof, 60, arrivals=Arrivals.trace(rate / base))
    assert rate > base and slo.holds(rep) and slo.achieved(rep) == plan.slo_check.achieved
    with pytest.raises(ExeGPTError, match="has no timestamps to replay"):
        find_schedule(W, slo, profile=prof, devices="1xA40", policies=["rra"], simulated=opts)


def test_unreachable_slos_name_what_is_reachable():
    prof = make_profile()
    opts = SimulatedSearch(num_requests=100, max_simulated=4)
    with pytest.raises(InfeasibleBoundError, match=r"is infeasible: of the 4 schedules simulated, the closest keeps "
                                                   r"90% of requests within [\d.]+ s"):
        find_schedule(W, CompletionSLO(1e-4, 0.9), profile=prof, devices="1xA40", simulated=opts)
    with pytest.raises(InfeasibleBoundError, match=r"even at a trickle of requests: .* the closest reaches p90 TTFT "
                                                   r"[\d.]+ s and TPOT [\d.]+ s"):
        find_schedule(W, RequestSLO(1e-4, 1e-4), profile=prof, devices="1xA40", simulated=opts)


def test_cli_slo_forms_and_simulated_runs(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--task", "S", "--ttft", "2", "--tpot", "0.15", "--devices", "2xA100", "--sim-requests",
                 "200", "--max-simulated", "3", "--policies", "rra", "cb", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "p90 TTFT <= 2 s and p90 TPOT <= 0.15 s: holds" in text and "goodput" in text
    assert "best of each policy" in text and "cb " in text
    assert Plan.load(out).slo == RequestSLO(2.0, 0.15)
    assert main(["simulate", "--plan", str(out), "--requests", "300", "--arrivals", "poisson:20"]) == 0
    text = capsys.readouterr().out
    assert "simulated engine: 300 requests, arrivals poisson 20/s" in text and "TTFT p50/p90/p99" in text
    assert "requests: 300 finished, 0 failed" in text
    assert main(["plan", "--task", "S", "--ttft", "2", "--bound", "3"]) == 2
    assert "give exactly one SLO" in capsys.readouterr().err
    assert main(["simulate", "--plan", str(out), "--requests", "10", "--arrivals", "trace"]) == 2
    assert "has no timestamps to replay" in capsys.readouterr().err
