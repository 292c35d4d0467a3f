"""A reduced closed loop, end to end: profile the tiny model on this CPU, plan under a bound, run the plan,
and check the run keeps what the plan promised."""

import math

import pytest

from exegpt import ExeGPTError, Kernel, Workload, find_schedule, smallest_feasible_bound
from profiler import profile_model
from profiler.grid import Grid
from profiler.loop import LATENCY_MARGIN, THREADS, demo, run_and_compare

GRID = Grid(batches=(1, 2, 4, 8, 16, 32, 64), seqs=(1, 8, 32, 64, 128), contexts=(1, 8, 32, 64, 128, 256),
            tokens=(1, 4, 16, 64, 256, 1024, 4096), bytes=(16, 4096))
# Outputs long enough (p99 ~ 90 tokens) that the bound-length latency spans ~0.1-0.3 s: a single scheduler hiccup
# of this shared 2-core machine (~20 ms) must not decide the test.
W = Workload.truncated_normal(input=(32, 12, 64), output=(48, 16, 96), name="loop")


def _profile():
    return profile_model("tiny", tp_degrees=(1,), quick=True, grid=GRID, collectives=False, progress=False,
                         threads=THREADS)


@pytest.fixture(scope="module")
def profile():
    return _profile()


def test_profile_measures_the_engine(profile):
    assert profile.has(Kernel.ENGINE_DECODE) and profile.has(Kernel.ENGINE_ENCODE)
    engine = profile.provenance["engine"]
    # Every schedule at every prompt level whose prompts (up to twice the mean) the grid's seq axis covers.
    assert engine["prompt_means"] == [16, 64]
    assert [(p["encode_batch"], p["decode_iters"]) for p in engine["points"]] == \
        [(1, 79), (2, 16), (4, 8), (4, 2), (8, 2), (16, 2), (32, 2)] * 2
    # Each point is the steady state its plan predicts: the measured decode batch is the plan's.
    for p in engine["points"]:
        assert p["measured_rows"] == pytest.approx(p["decode_rows"], rel=0.1)
    assert all(c >= 0 for c in engine["encode_fit_s"] + engine["decode_fit_s"])
    # The tables are the fits: a + b n + c n L at every grid point.
    a, b, c = engine["decode_fit_s"]
    t = next(t for t in profile.tables if t.kernel == Kernel.ENGINE_DECODE)
    n, L = 100.0, sum(t.ys) / 2  # inside the grid: bilinear interpolation of a bilinear function is exact
    assert profile.seconds(Kernel.ENGINE_DECODE, 1, n, L) == pytest.approx(a + b * n + c * n * L)


def test_the_waa_calibration_runs_a_waa_plan_and_records_its_concurrency_and_lockstep():
    """calibrate_waa runs a WAA plan on two ranks of this CPU: the concurrency makes the estimate's group times the
    measured ones (at least 1), and the factor is the measured period over the longer part against the estimate's
    same ratio with that concurrency (at least 1); raw values and the run in the provenance."""
    from exegpt.stages import concurrent_times
    from profiler.engine import WAA_SCHEDULES, calibrate_waa
    from tests.exegpt.conftest import tiny_cpu_profile

    base = tiny_cpu_profile()
    prof = calibrate_waa(base, "tiny", runs=1)
    facts = prof.provenance["waa_period"]
    assert facts["schedules"] == [str(WAA_SCHEDULES[0])] and facts["requests"][0] >= 48
    [t_e], [t_d] = facts["encode_plain_s"], facts["decode_plain_s"]
    [m_e], [m_d] = facts["encode_meas_s"], facts["decode_meas_s"]
    c = prof.concurrency(2)
    assert c == facts["concurrency"] >= 1.0 and facts["probe_concurrency"] == base.concurrency(2)
    if c > 1.0:  # the mean of the two groups' concurrencies: their summed times match the measured ones
        e, d = concurrent_times(c, t_e, t_d, True, True)
        assert e + d == pytest.approx(m_e + m_d)
    [ratio] = facts["period_ratio"]
    assert facts["raw"] == ratio and math.isfinite(ratio) and ratio > 0
    assert prof.waa_period_factor == max(1.0, facts["raw"])
    assert prof.tables == base.tables and base.waa_period_factor == 1.0
    assert prof.rank_slowdown == base.rank_slowdown


def _closed_loop(profile):
    # Three times the fastest schedule's latency leaves the search a real choice of batch sizes.
    bound = 3 * smallest_feasible_bound(W, profile=profile, devices="1xcpu")
    plan = find_schedule(W, bound, profile=profile, devices="1xcpu", latency_margin=LATENCY_MARGIN)
    assert plan.estimate.latency_s <= bound * (1 - LATENCY_MARGIN)
    [c] = run_and_compare([("best", plan)], "tiny", num_requests=300)
    return bound, c


def test_reduced_loop_keeps_the_bound_the_plan_promised(profile):
    bound, c = _closed_loop(profile)
    if not c.report.latency_s <= bound:
        # This shared 2-core VM's speed swings by up to 1.5x within minutes (benchmarks/fidelity.py's spread):
        # a missed bound is judged on a second loop, profiled afresh just before its run, as a user would redo it.
        bound, c = _closed_loop(_profile())
    r = c.report
    assert r.num_finished == 300 and r.num_failed == 0
    assert math.isfinite(r.latency_s) and r.latency_s <= bound
    # The estimate is a usable prediction, not an order of magnitude off.
    assert c.throughput_error < 0.5


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_demo_rounds_must_be_a_whole_number(bad, capsys):
    with pytest.raises(ExeGPTError, match=rf"rounds={bad!r} must be a whole number >= 1"):
        demo(rounds=bad)
    assert capsys.readouterr().out == ""  # refused before it printed or measured anything


def test_run_and_compare_runs_in_the_profiles_precision(profile, monkeypatch):
    """What runs is what was timed: the runs take the profile's dtype unless told otherwise."""
    import dataclasses

    from profiler import loop

    seen = []
    real = loop.run_plans

    def spy(plans, model, **kw):
        seen.append(kw["dtype"])
        return real(plans, model, **kw)

    monkeypatch.setattr(loop, "run_plans", spy)
    plan = find_schedule(W, 3 * smallest_feasible_bound(W, profile=profile, devices="1xcpu"), profile=profile,
                         devices="1xcpu")
    bf16 = dataclasses.replace(profile, dtype="bf16")
    [c] = run_and_compare([("bf16", plan)], "tiny", num_requests=12, profile=bf16)
    assert c.report.num_finished == 12 and c.simulated is not None
    run_and_compare([("fp32", plan)], "tiny", num_requests=12)
    run_and_compare([("fp16", plan)], "tiny", num_requests=12, profile=bf16, dtype="fp16")
    assert seen == ["bf16", "fp32", "fp16"]
