"""The exegpt-run CLI: runs a plan file, writes a report, and rejects bad arguments with one line and exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from exegpt import Estimate, ExeGPTError, LatencyBound, Plan, RRASchedule, Stage, Workload
from runner import run_plan
from runner.__main__ import main
from exegpt.report import FAILED, RunReport

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def plan_file(tmp_path) -> Path:
    plan = Plan(schedule=RRASchedule(3, 2, 1, 0, 1),
                estimate=Estimate(5.0, 40.0, 0.5, 6, 0.01, 0.004, 5.0), bound=LatencyBound(2.0),
                profile_id="tiny@cpu", model="tiny", devices="1xCPU",
                workload=Workload.truncated_normal((10, 3, 16), (6, 2, 10)), stages=(Stage("both", 1, 0, 2),))
    return plan.save(tmp_path / "plan.json")


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0] and err[0].startswith("exegpt-run: error:")
    return err[0]


def test_run_writes_report_and_prints_table(plan_file, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["--plan", str(plan_file), "--model", "tiny", "--requests", "9", "--report", str(out),
                 "--seed", "2", "--no-progress", "--arrivals", "poisson:200"]) == 0
    text = capsys.readouterr().out
    assert "predicted" in text and "measured" in text and "9 finished" in text and "TTFT p50/p90/p99" in text
    rep = RunReport.load(out)
    assert rep.num_finished == 9 and rep.policy == "rra" and rep.estimate.latency_len == 6
    assert len(rep.requests) == 9 and rep.requests[-1].arrival_s > 0 and rep.ttft.p99 >= rep.ttft.p50 > 0
    assert all(r.encode_start_s >= r.arrival_s for r in rep.requests)


def test_trace_with_over_long_requests(plan_file, tmp_path, capsys):
    trace = tmp_path / "t.csv"
    trace.write_text("num_prefill_tokens,num_decode_tokens\n8,4\n40,4\n5,3\n")
    out = tmp_path / "r.json"
    assert main(["--plan", str(plan_file), "--requests", "12", "--trace", str(trace), "--report", str(out),
                 "--no-progress"]) == 0
    rep = RunReport.load(out)
    failed = [r for r in rep.requests if r.status == FAILED]
    assert failed and all(r.input_len == 40 and "budget" in r.reason for r in failed)
    assert rep.num_finished + len(failed) == 12
    assert "failed:" in capsys.readouterr().out


@pytest.mark.parametrize("argv,needle", [
    ([], "--plan"),
    (["--plan", "/nonexistent/plan.json"], "cannot read plan"),
    (["--plan", "PLAN", "--model", "no-such-model"], "unknown model"),
    (["--plan", "PLAN", "--dtype", "fp8"], "fp8"),
    (["--plan", "PLAN", "--requests", "0"], "--requests"),
    (["--plan", "PLAN", "--requests", "many"], "many"),
    (["--plan", "PLAN", "--trace", "nope.csv"], "trace"),
    (["--plan", "PLAN", "--report", "/nonexistent/dir/r.json"], "does not exist"),
    (["--plan", "PLAN", "--arrivals", "poisson:0"], "arrival rate 0.0 requests/s must be a finite number > 0"),
    (["--plan", "PLAN", "--arrivals", "trace"], "has no timestamps to replay"),
    (["--plan", "PLAN", "--requests", "1000000000"], "number of requests 1000000000 must be a whole number in [1, "),
    (["--plan", "PLAN", "--seed", "-1"], "seed -1 must be a whole number >= 0"),
])
def test_bad_arguments_exit_2_with_one_line(plan_file, capsys, argv, needle):
    argv = [str(plan_file) if a == "PLAN" else a for a in argv]
    assert main(argv) == 2
    assert needle in _one_error_line(capsys)


def test_bad_plan_json(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["--plan", str(bad)]) == 2
    assert "not valid JSON" in _one_error_line(capsys)
    with pytest.raises(ExeGPTError, match=r"plan must be a Plan \(find_schedule's result, or Plan.load\(path\)\), "
                                          r"got str 'plan.json'"):
        run_plan("plan.json")


def test_module_entry_point_bad_args():
    proc = subprocess.run([sys.executable, "-m", "runner", "--plan", "/nonexistent.json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot read plan" in lines[0]


def test_commands_without_torch_say_so_in_one_line(monkeypatch, capsys):
    """The solver-only install has no torch: exegpt-run, exegpt-profile and exegpt-demo name the extra to install."""
    import importlib.util

    from profiler import entry as profiler_entry
    from runner import entry

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    for command, fn in (("exegpt-run", entry.run), ("exegpt-profile", profiler_entry.profile),
                        ("exegpt-demo", profiler_entry.demo)):
        assert fn(["--help"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{command}: error: needs torch" in err and "'.[runner]'" in err


def test_progress_off_a_terminal_is_periodic_lines():
    """A log file or a pipe gets plain lines (none of tqdm's carriage-return frames): one per interval, one at the
    end."""
    import io

    from runner.progress import LineProgress, progress_bar

    out = io.StringIO()
    bar = progress_bar(10, "requests", "req", file=out)
    assert isinstance(bar, LineProgress)
    bar.every_s = 0.0
    bar.update(3)
    bar.set_postfix_str("tp=1")
    bar.update(7)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 3
    assert lines[0].startswith("requests: 3/10 req in ") and lines[-1].endswith(", tp=1")
