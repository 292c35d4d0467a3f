"""benchmarks/fidelity.py's attribution row: measured / predicted per cost term, and WAA's time outside both."""

import dataclasses
import json
import math
import sys

import pytest
import torch

from exegpt import Policy, RRASchedule, WAASchedule, Workload, evaluate_schedule
from benchmarks import fidelity
from benchmarks.fidelity import _attribution, cases, noise_floor, save_rounds
from profiler.loop import Comparison, median_comparison
from exegpt.report import RunReport
from tests.exegpt.conftest import make_profile, tiny_cpu_profile

W = Workload.truncated_normal(input=(64, 20, 128), output=(32, 10, 80), name="t")


def _report(plan, thr, enc, step, batch, latency_s=0.5):
    return RunReport(policy=plan.schedule.policy.value, throughput_seq_s=thr, throughput_tok_s=thr * 32,
                     latency_s=latency_s, latency_len=plan.estimate.latency_len, encode_stage_s=enc, decode_step_s=step,
                     decode_batch=batch)


def test_waa_row_gives_each_term_and_the_time_outside_both():
    plan = evaluate_schedule(WAASchedule(Policy.WAA_C, 4, 32, 1, 0, 1, 1), W, profile=make_profile(), devices="2xA40")
    e = plan.estimate
    # Measured: encode 1.5x, step 2x, batch 0.5x; 4 queries per 5 decode steps' time -> outside = 5 step / 1 step.
    rep = _report(plan, 4 / (5 * 2 * e.decode_step_s), 1.5 * e.encode_stage_s, 2 * e.decode_step_s,
                  0.5 * e.decode_batch)
    cols = _attribution(Comparison("w", plan, rep)).split()
    longer = max(1.5 * e.encode_stage_s, 2 * e.decode_step_s)
    arith = abs(e.throughput_seq_s * max(e.encode_stage_s, e.decode_step_s) / longer - rep.throughput_seq_s) \
        / rep.throughput_seq_s
    assert cols == ["w", "1.50x", "2.00x", "0.50x", f"{4 / rep.throughput_seq_s / longer:.2f}x", f"{100 * arith:.1f}%"]


def test_rra_row_has_no_outside_and_a_missing_measurement_is_a_dash():
    plan = evaluate_schedule(RRASchedule(4, 4, 1, 0, 1), W, profile=make_profile(), devices="1xA40")
    rep = _report(plan, 100.0, float("nan"), 3 * plan.estimate.decode_step_s, plan.estimate.decode_batch)
    assert _attribution(Comparison("r", plan, rep)).split() == ["r", "-", "3.00x", "1.00x", "-", "-"]


def test_drift_scales_the_prediction_and_one_means_unscaled():
    """A machine 25 % slower at run time than at profile time (drift 1.25): the predicted seconds scaled by it
    match a run that is exactly that much slower, while the unscaled error shows the whole gap."""
    plan = evaluate_schedule(RRASchedule(4, 4, 1, 0, 1), W, profile=make_profile(), devices="1xA40")
    e = plan.estimate
    rep = _report(plan, e.throughput_seq_s / 1.25, e.encode_stage_s, e.decode_step_s, e.decode_batch,
                  latency_s=e.latency_s * 1.25)
    c = Comparison("r", plan, rep, drift=1.25)
    assert abs(c.drift_throughput_error) < 1e-12 and abs(c.throughput_error - 0.25) < 1e-12
    assert abs(c.drift_latency_error) < 1e-12 and abs(c.latency_error - 0.2) < 1e-12
    plain = Comparison("r", plan, rep)
    assert plain.drift == 1.0 and plain.drift_throughput_error == plain.throughput_error


def test_median_comparison_takes_each_sides_median_over_rounds_and_skips_unseen_latencies():
    """Three rounds of one plan, each with its own prediction (profile) and measurement: the row compares the
    median prediction with the median measurement, field by field; a round where no request reached the bound
    length (NaN latency) does not count towards the latency median."""
    plan = evaluate_schedule(RRASchedule(4, 4, 1, 0, 1), W, profile=make_profile(), devices="1xA40")
    e = plan.estimate
    rounds = []
    for k, (p_thr, m_thr, m_lat) in enumerate(((100.0, 90.0, 0.4), (120.0, 150.0, math.nan), (80.0, 95.0, 0.6))):
        p = dataclasses.replace(plan, estimate=dataclasses.replace(e, throughput_seq_s=p_thr, latency_s=0.1 * k))
        rounds.append(Comparison("r", p, _report(p, m_thr, 0.01 * k, 0.001, 4.0, latency_s=m_lat), drift=1 + k))
    c = median_comparison(rounds)
    assert (c.plan.estimate.throughput_seq_s, c.report.throughput_seq_s) == (100.0, 95.0)
    assert c.plan.estimate.latency_s == 0.1 and c.report.latency_s == 0.5 and c.report.encode_stage_s == 0.01
    assert c.drift == 2 and c.report.latency_len == plan.estimate.latency_len
    assert abs(c.throughput_error - 5 / 95) < 1e-12
    other = dataclasses.replace(plan, schedule=RRASchedule(8, 4, 1, 0, 1))
    with pytest.raises(ValueError, match="one schedule"):
        median_comparison([rounds[0], Comparison("r", other, rounds[0].report)])


def test_noise_floor_predicts_each_run_by_the_median_of_the_others():
    got = noise_floor([[100.0, 110.0, 90.0], [50.0, math.nan, 40.0], [7.0]])
    assert got == pytest.approx([0.0, 15 / 110, 15 / 90, 10 / 50, 10 / 40])


def test_save_rounds_writes_each_rounds_prediction_and_measurement(tmp_path):
    plan = evaluate_schedule(RRASchedule(4, 4, 1, 0, 1), W, profile=make_profile(), devices="1xA40")
    rep = _report(plan, 90.0, 0.01, 0.002, 4.0, latency_s=math.nan)
    save_rounds([[Comparison("r", plan, rep)], [Comparison("r", plan, _report(plan, 80.0, 0.01, 0.002, 4.0))]],
                tmp_path / "runs.json")
    got = json.loads((tmp_path / "runs.json").read_text())
    assert [g["r"]["measured"]["throughput_seq_s"] for g in got] == [90.0, 80.0]
    assert math.isnan(got[0]["r"]["measured"]["latency_s"]) and got[1]["r"]["measured"]["latency_s"] == 0.5
    assert got[0]["r"]["predicted"]["throughput_seq_s"] == plan.estimate.throughput_seq_s
    assert got[0]["r"]["schedule"] == "RRA B_E=4 N_D=4 TP1x0" and got[0]["r"]["simulated"] is None


def test_cases_on_one_gpu_are_the_one_device_plans_of_that_gpu():
    cpu = tiny_cpu_profile()
    both = cases(cpu, 2)
    one_gpu = cases(dataclasses.replace(cpu, device="H200"), 1)
    assert {p.devices for _, p in both} == {"1xcpu", "2xcpu"} and len(both) == 23
    assert [n for n, _ in one_gpu] == [n for n, p in both if p.devices == "1xcpu"]
    assert all(p.devices == "1xH200" and p.schedule.num_gpus == 1 for _, p in one_gpu)


@pytest.mark.parametrize("schedule,devices", [(RRASchedule(4, 4, 1, 0, 1), "1xA40"),
                                              (WAASchedule(Policy.WAA_C, 4, 32, 1, 0, 1, 1), "2xA40")])
def test_phase_time_error_is_zero_when_only_the_phase_costs_differ(schedule, devices):
    """A run whose phases all took 1.6x their predicted time and whose throughput is 1/1.6 of the prediction
    has the schedule's arithmetic exactly right; a run that also completed 10 % fewer sequences is 10 % off."""
    plan = evaluate_schedule(schedule, W, profile=make_profile(), devices=devices)
    e = plan.estimate
    slow = _report(plan, e.throughput_seq_s / 1.6, 1.6 * e.encode_stage_s, 1.6 * e.decode_step_s, e.decode_batch)
    c = Comparison("p", plan, slow)
    assert c.phase_time_throughput_error == pytest.approx(0, abs=1e-12) and c.throughput_error == pytest.approx(0.6)
    fewer = dataclasses.replace(slow, throughput_seq_s=0.9 * slow.throughput_seq_s)
    assert Comparison("p", plan, fewer).phase_time_throughput_error == pytest.approx(1 / 0.9 - 1)


def _bad_run(monkeypatch, capsys, argv):
    monkeypatch.setattr(sys, "argv", ["fidelity.py", *argv])
    with pytest.raises(SystemExit) as e:
        fidelity.main()
    assert e.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_bad_arguments_are_one_line_each(monkeypatch, capsys, tmp_path):
    shipped = "tests/data/tiny-cpu.json"
    assert _bad_run(monkeypatch, capsys, ["--rounds", "0"]).endswith("--rounds 0 must be a whole number >= 1")
    assert _bad_run(monkeypatch, capsys, ["--profile", shipped, "--model", "small"]).endswith(
        f"--profile {shipped} was measured for 'tiny', not for --model 'small'")
    assert "not allowed with" in _bad_run(monkeypatch, capsys, ["--profile", shipped, "--cached-profile"])
    prof = tiny_cpu_profile()
    two = dataclasses.replace(prof, provenance=prof.provenance | {"torch_threads": 2})
    two.save(tmp_path / "two.json")
    assert _bad_run(monkeypatch, capsys, ["--profile", str(tmp_path / "two.json")]).endswith(
        "was measured with 2 torch threads; the runs use 1 (python -m profiler --threads 1)")
    gpu = dataclasses.replace(prof, device="H200")
    gpu.save(tmp_path / "gpu.json")
    if not torch.cuda.is_available():
        assert _bad_run(monkeypatch, capsys, ["--profile", str(tmp_path / "gpu.json")]).endswith(
            "was measured on 'H200'; the runs execute on cpu here")
