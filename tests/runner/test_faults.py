"""Faults during a run: a rank SIGKILLed, a hand-off that never arrives, a request longer than the cache. The run
ends within its stated timeout, and its report holds every request: finished (as reported before the failure,
with its greedy tokens) or failed with the reason."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from exegpt import Policy, Profile, RRASchedule, Stage, WAASchedule, evaluate_schedule
from exegpt.policies.cb import CBSchedule
from exegpt.policies.disagg import DisaggSchedule
from exegpt.policies.shift import ShiftSchedule
from exegpt.report import FAILED, RunReport
from runner.launch import Fault, RankFailedError
from runner.generate import greedy_reference
from runner.requests import Request, make_requests, requests_from_pairs
from runner.run import run_plan
from runner.weights import load_model

from tests.runner.test_executors import PP2, WORKLOAD, assert_complete, make_plan

SPLIT = (Stage("encode", 1, 0, 2), Stage("decode", 1, 0, 2))
PROFILE = Path(__file__).resolve().parents[1] / "data" / "tiny-cpu.json"


@pytest.fixture(scope="module")
def requests_and_one_too_long():
    """14 requests of the executors' workload plus one whose prompt and output exceed the cache's 36 positions
    a row."""
    reqs = make_requests(WORKLOAD, 14, vocab_size=256, seed=3)
    [long] = requests_from_pairs([(30, 20)], vocab_size=256, seed=9)
    return reqs + (Request(len(reqs), long.prompt, long.output_len),)


@pytest.fixture(scope="module")
def reference(requests_and_one_too_long):
    torch.set_num_threads(1)
    model, _, _ = load_model("tiny")
    return {r.id: greedy_reference(model, list(r.prompt), r.output_len) for r in requests_and_one_too_long[:-1]}


def _failed_with(report: RunReport, error: str) -> dict[int, str]:
    return {r.id: r.reason for r in report.requests if r.status == FAILED and error in r.reason}


def _plan(policy: str):
    if policy == "shift":  # SP 2 for steps of 16 tokens or more, TP 2 under: a rank dies between collectives
        plan = evaluate_schedule(ShiftSchedule(40, 6, 2, 1, 16, 1, 2, block_size=8), WORKLOAD,
                                 profile=Profile.load(PROFILE), devices="2xcpu")
        return dataclasses.replace(plan, estimate=dataclasses.replace(plan.estimate, kv_tokens=200.0))
    schedule, stages = {"disagg": (DisaggSchedule(6, 40, 1, 1, block_size=4), SPLIT),
                        "waa": (WAASchedule(Policy.WAA_C, 3, 2, 1, 0, 1, 1), SPLIT),
                        "rra": (RRASchedule(4, 3, 1, 0, 2), PP2)}[policy]
    return make_plan(schedule, stages)


@pytest.mark.slow
@pytest.mark.parametrize("policy,fault,timeout_s,error", [
    # The decode group's driver (rank 1) holds the report: what it finished reached the launcher before it died.
    ("disagg", Fault(1, 20, "kill"), 60, "rank 1 died (exit code -9, SIGKILL)"),
    # The encoder stops after its third command: the decode group waits for a batch that never comes.
    ("waa", Fault(0, 3, "hang"), 8, "run exceeded 8 s"),
    # The pipeline's first stage, which also drives it and holds the report.
    ("rra", Fault(0, 12, "kill"), 60, "rank 0 died (exit code -9, SIGKILL)"),
    # Shift Parallelism: its peer waits in an all-to-all or all-reduce that can never complete.
    ("shift", Fault(1, 10, "kill"), 60, "rank 1 died (exit code -9, SIGKILL)"),
])
def test_a_failed_run_reports_every_request(policy, fault, timeout_s, error, requests_and_one_too_long, reference):
    reqs = requests_and_one_too_long
    t = time.monotonic()
    with pytest.raises(RankFailedError) as e:
        run_plan(_plan(policy), "tiny", requests=reqs, fault=fault, timeout_s=timeout_s, keep_tokens=True)
    assert time.monotonic() - t < timeout_s + 10  # the stated limit, and the teardown
    assert error in str(e.value)
    [report] = e.value.reports
    assert_complete(report, reqs, reference)
    assert report.num_finished + report.num_failed == len(reqs) == report.num_requests
    too_long = report.requests[-1]
    assert too_long.status == FAILED and "exceeds the plan's KV-cache budget of 36" in too_long.reason
    assert len(_failed_with(report, error)) == report.num_failed - 1 >= 1


def _rank_processes(parent: int) -> list[int]:
    """The spawned rank processes of ``parent`` (their command lines name multiprocessing's spawn entry)."""
    out = []
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent and b"spawn_main" in cmd:
            out.append(pid)
    return sorted(out)


@pytest.mark.slow
def test_cli_writes_the_report_of_a_run_whose_rank_was_killed(tmp_path):
    """A rank of a TP-2 continuous-batching run is SIGKILLed from outside while requests arrive: exegpt-run
    ends with one line naming it, exit code 1, and the report it writes holds every request."""
    plan = make_plan(CBSchedule(8, 64, 2, 2, 2, block_size=4), (Stage("both", 2, 0, 2),))
    plan.save(tmp_path / "plan.json")
    cmd = [sys.executable, "-m", "runner", "--plan", str(tmp_path / "plan.json"), "--requests", "400",
           "--arrivals", "poisson:40", "--report", str(tmp_path / "report.json"), "--timeout", "120",
           "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while len(ranks := _rank_processes(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(ranks) == 2, "the ranks did not start"
        time.sleep(4.0)  # into the run
        os.kill(ranks[-1], signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1, err[-2000:]
    [line] = [ln for ln in err.splitlines() if ln.startswith("exegpt-run")]
    assert "died (exit code -9, SIGKILL)" in line and "report written to" in line, line
    report = RunReport.from_dict(json.loads((tmp_path / "report.json").read_text()))
    assert sorted(r.id for r in report.requests) == list(range(400))
    assert report.num_failed >= 1 and all(r.reason for r in report.requests if r.status == FAILED)
    assert all(r.num_generated == r.output_len for r in report.requests if r.status != FAILED)
