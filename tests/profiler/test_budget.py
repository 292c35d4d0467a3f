"""The budgeted profiler: durations, the plan within a budget, fits of unmeasured cells, what a plan reads from
them, the grid cut at a workload, bad input in one line, and a partial profile on Ctrl-C."""

import json
import time

import numpy as np
import pytest

from exegpt import RRASchedule, Workload, evaluate_schedule
from exegpt.errors import ExeGPTError
from exegpt.extrapolation import extrapolation_note, plan_reads
from exegpt.profile import Kernel, Profile
from profiler import profile_model
from profiler.__main__ import main
from profiler.budget import format_duration, parse_duration
from profiler.fit import fill_table
from profiler.grid import Grid

SMALL = Grid(batches=(1, 4, 16, 64, 128), seqs=(1, 8, 32, 64, 128, 256, 512), contexts=(1, 16, 128, 512),
             tokens=(1, 4, 16, 64, 256, 1024), bytes=(16, 4096))
W = Workload.truncated_normal(input=(200, 100, 400), output=(16, 8, 32), name="long prompts")


@pytest.mark.parametrize("text,seconds", [("300", 300), ("90s", 90), ("5m", 300), ("1m30s", 90), ("1h", 3600),
                                          ("0.5s", 0.5), (42, 42)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["0", "-5m", "0s", "5 minutes", "", "m5"])
def test_bad_durations_are_one_line(text):
    with pytest.raises(ExeGPTError, match="budget") as e:
        parse_duration(text)
    assert "\n" not in str(e.value)
    assert format_duration(75.3) == "1m15s" and format_duration(4.24) == "4.2s"


def test_fill_table_follows_the_known_forms():
    """Unmeasured cells of a prefill table (linear in batch, quadratic in length) are filled along the batch axis
    where a column has two measured cells, else along the length axis; exact on an exact form."""
    b, s = np.array([1, 2, 4, 8, 16.]), np.array([16, 64, 256, 1024.])
    B, S = np.meshgrid(b, s, indexing="ij")
    t = 1e-5 + B * (2e-9 * S + 3e-12 * S * S)
    measured = B * S * S <= 8 * 256 ** 2  # the cheap corner, as a budget measures
    measured[0, -1] = True  # one long prompt: the last column has a single cell, so its rows fill along length
    out, fit = fill_table(Kernel.ATTN_ENCODE, b, s, np.where(measured, t, 0.0), measured)
    assert out == pytest.approx(t, rel=1e-4)
    assert fit.held_out_error == pytest.approx(0.0, abs=1e-6) and fit.held_out_points >= 1


@pytest.fixture(scope="module")
def budgeted():
    lines = []
    t0 = time.perf_counter()
    prof = profile_model("tiny", quick=True, grid=SMALL, collectives=False, progress=False, threads=1, engine=False,
                         budget_s=6.0, report=lines.append)
    return prof, lines, time.perf_counter() - t0


def test_a_budget_is_planned_up_front_kept_and_recorded(budgeted):
    prof, lines, wall = budgeted
    assert lines[0].startswith("budget 6.0s") and any(line.strip().startswith("attn_encode tp=1: measure")
                                                      for line in lines)
    assert wall < 6.0  # the kernel phase's share of the budget, and the step overhead
    b = prof.provenance["budget"]
    assert b["budget_s"] == 6.0 and not prof.partial
    enc = next(t for t in prof.tables if t.kernel is Kernel.ATTN_ENCODE)
    flags = np.asarray(enc.fitted)
    assert flags.any() and not flags[0, 0]  # the costliest cells fitted, the cheapest measured
    assert b["tables"]["attn_encode tp=1"]["fitted"] == flags.sum()
    assert prof.fit_error(Kernel.ATTN_ENCODE) is not None


def test_the_solver_says_when_a_plan_reads_fitted_cells(budgeted):
    prof = budgeted[0]
    # Encode batches of the grid's largest batch at long prompts: the costliest cells, the fitted ones.
    plan = evaluate_schedule(RRASchedule(128, 4, 1, 0, 1), W, profile=prof, devices="1xcpu")
    reads = plan_reads(plan, prof)
    assert reads[(Kernel.ATTN_ENCODE, 1)].fitted > 0
    note = extrapolation_note(plan, prof)
    assert "attn_encode tp=1 fitted cells (held-out error" in note and "\n" not in note
    measured_only = Profile.from_dict(json.loads(prof.to_json()) | {"tables": [
        t.to_dict() | {"fitted": None} for t in prof.tables]})
    assert (Kernel.ATTN_ENCODE, 1) not in plan_reads(plan, measured_only)


def test_grid_stops_at_the_workloads_lengths_and_memory():
    from profiler.sweep import resolve_target

    w = Workload.truncated_normal(input=(40, 20, 100), output=(20, 10, 60), name="short")
    t = resolve_target("tiny", quick=True, workload=w, fit_memory=True)
    assert t.grid.seqs[-1] == 100 and t.grid.contexts[-1] == 160 and t.max_prompt == 100
    assert resolve_target("tiny", quick=True).grid.seqs[-1] == 512


@pytest.mark.parametrize("args,match", [
    (["--budget", "0"], "budget '0' must be a duration > 0"),
    (["--budget", "soon"], "is not a duration"),
    (["--budget", "0.01s"], r"shorter than one measurement .* expected a budget of at least \d+s"),
    (["--workload", "S"], "longer than tiny's context of 512"),
])
def test_cli_bad_budget_or_workload_is_one_line(tmp_path, capsys, args, match):
    argv = ["--model", "tiny", "--max-seq", "64", "--max-batch", "4", "--max-tokens", "16", "--no-collectives",
            "--no-progress", "--threads", "1", "-o", str(tmp_path / "p.json")]
    assert main(argv + args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert pytest.importorskip("re").search(match, err)


def test_ctrl_c_saves_a_partial_profile(tmp_path, monkeypatch, capsys):
    """Interrupted in its third attention table, the sweep saves what it measured, the rest fitted, marked
    partial; the file loads and plans."""
    from profiler import tables

    real, calls = tables.measure, []

    def interrupt_late(fn, setup, repeat, device):
        calls.append(1)
        if len(calls) > 30:  # in attn_encode, after dense_*, lm_head and attn_decode (28 points)
            raise KeyboardInterrupt
        return real(fn, setup, 1, device)

    monkeypatch.setattr(tables, "measure", interrupt_late)
    out = tmp_path / "p.json"
    import profiler.sweep as sweep

    grid = Grid(batches=(1, 2, 4, 8), seqs=(1, 8, 32, 64), contexts=(1, 16, 64), tokens=(1, 4, 16, 64), bytes=(16,))
    monkeypatch.setattr(sweep, "resolve_target", lambda *a, _r=sweep.resolve_target, **k: _r(*a[:5], grid, **k))
    rc = main(["--model", "tiny", "--no-collectives", "--no-progress", "--threads", "1", "--budget", "none",
               "-o", str(out)])
    assert rc == 130 and "partial profile" in capsys.readouterr().err
    prof = Profile.load(out)
    assert prof.partial and prof.provenance["partial"] is True
    assert not prof.has(Kernel.ENGINE_DECODE)  # interrupted before the executor's calibration
    assert prof.seconds(Kernel.ATTN_ENCODE, 1, 8, 64) > 0


def test_engine_residual_fits_no_more_terms_than_its_runs_tell_apart():
    """One calibration run gives a per-step cost only (not three unknowns fitted to one point), two a per-row cost
    too, three or more the per-row-per-token term as well; exact residuals are recovered."""
    from profiler.engine import _fit

    def run(n, L):  # (rows, length, residual, measured) of a + b n + c n L with a = 2 ms, b = 0.3 ms, c = 1 us
        r = 2e-3 + 3e-4 * n + 1e-6 * n * L
        return (n, L, r, 5 * r)

    assert _fit([run(16, 100)]) == pytest.approx((2e-3 + 3e-4 * 16 + 1e-6 * 1600, 0.0, 0.0))
    a, b, c = _fit([run(4, 100), run(16, 100)])
    assert c == 0.0 and a + b * 16 == pytest.approx(run(16, 100)[2])
    assert _fit([run(4, 100), run(16, 100), run(64, 50), run(16, 400)]) == pytest.approx((2e-3, 3e-4, 1e-6))
