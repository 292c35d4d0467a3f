import subprocess
import sys

import numpy as np
import pytest

from exegpt import Plan, Workload, find_schedule
from exegpt.errors import ExeGPTError
from exegpt.__main__ import main

from .conftest import make_profile


def test_plan_writes_a_plan_file_and_prints_a_table(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--task", "S", "--bound", "5.9", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "throughput" in text and "vs static batching" in text
    plan = Plan.load(out)
    assert plan.estimate.latency_s <= 5.9


def test_plan_from_trace_and_profile_file(tmp_path, capsys):
    trace = tmp_path / "t.csv"
    trace.write_text("num_prefill_tokens,num_decode_tokens\n" + "".join(f"{20 + i % 50},{5 + i % 17}\n"
                                                                         for i in range(200)))
    prof = make_profile().save(tmp_path / "p.json")
    assert main(["plan", "--trace", str(trace), "--bound", "inf", "--profile", str(prof), "--devices", "2xA40",
                 "-o", str(tmp_path / "plan.json")]) == 0


def test_a_trace_over_the_models_context_is_dropped_or_clipped_to_it(tmp_path, capsys):
    """The README's example: the Azure code trace reaches 9,336 tokens, Llama-2-7B holds 4,096."""
    w = Workload.trace("azure_code")
    with pytest.raises(ExeGPTError, match="reaches 9336 tokens"):
        find_schedule(w, 20.0, model="llama-2-7b", devices="2xA100", policies=["rra"])
    kept, dropped, (p_cap, o_cap) = w.within_context(4096, "drop")
    assert kept.max_total_len <= 4096 and p_cap + o_cap == 4096 and len(kept.pairs) + dropped == len(w.pairs)
    assert all(i <= p_cap and o <= o_cap for i, o in kept.pairs) and len(kept.arrivals_s) == len(kept.pairs)
    # No other split of the context keeps more requests whole.
    pairs = np.asarray(w.pairs)
    assert all(((pairs[:, 1] <= c) & (pairs[:, 0] <= 4096 - c)).sum() <= len(kept.pairs) for c in range(1, 4096, 7))
    clipped, n, _ = w.within_context(4096, "clip")
    assert n == dropped and len(clipped.pairs) == len(w.pairs) and clipped.max_total_len <= 4096
    assert main(["plan", "--builtin-trace", "azure_code", "--bound", "20", "--model", "llama-2-7b", "--devices",
                 "2xA100", "--max-context", "drop", "--policies", "rra", "-o", str(tmp_path / "p.json")]) == 0
    assert f"azure_code: {dropped} of {len(w.pairs)} requests dropped to fit 4096 tokens" in capsys.readouterr().out
    with pytest.raises(ExeGPTError, match="has no joint sample"):
        Workload.truncated_normal((3000, 100, 4000), (500, 10, 600)).within_context(4096)


def test_plan_verify_prints_the_replayed_worst_latency_it_kept(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--task", "S", "--bound", "9.8", "--verify", "100", "-o", str(out)]) == 0
    plan = Plan.load(out)
    assert plan.search.replay_requests == 100 and plan.search.replay_latency_s <= 9.8
    assert f"replayed worst latency         {plan.search.replay_latency_s:.3f} s on 100 requests" in \
        capsys.readouterr().out


def test_sweep_and_simulate(capsys):
    assert main(["sweep", "--task", "C1", "--bounds", "5", "inf"]) == 0
    assert main(["simulate", "--task", "C1", "--schedule", "rra:encode_batch=8,decode_iters=4"]) == 0
    out = capsys.readouterr().out
    assert "inf" in out and "simulated: RRA" in out


@pytest.mark.parametrize("args,match", [
    (["plan", "--task", "X", "--bound", "3"], "unknown task 'X'"),
    (["plan", "--task", "S", "--bound", "0"], "latency bound 0.0"),
    (["plan", "--task", "S", "--bound", "abc"], "'abc' is not a number"),
    (["plan", "--task", "S", "--bound", "3", "--devices", "2xA40", "--tp", "4"], "TP degree 4 exceeds"),
    (["plan", "--task", "S", "--bound", "1"], "smallest feasible bound is"),
    (["plan", "--bound", "3"], "give exactly one workload"),
    (["plan", "--input", "1,2", "--output", "3,4,5", "--bound", "3"], "is not MEAN,STD,MAX"),
    (["simulate", "--task", "S", "--schedule", "rra:encode_batch=x"], "is not an integer"),
    (["plan", "--task", "S", "--bound", "9.8", "--verify", "-2"], "verify_requests=-2 must be a whole number >= 0"),
    (["plan", "--task", "S", "--bound", "9.8", "--verify", "5", "--exhaustive"], "drop --exhaustive or --verify"),
])
def test_bad_arguments_exit_2_with_one_line(args, match, capsys):
    try:
        code = main(args)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert match in err and err.count("\n") == 1 and "Traceback" not in err


def test_the_process_exits_2_with_one_line():
    r = subprocess.run([sys.executable, "-m", "exegpt", "plan", "--task", "S", "--bound", "abc"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "'abc' is not a number" in r.stderr


def test_figures_draw_what_they_say(tmp_path, capsys):
    """Each figure renders to a PNG with its curves and labelled axes: the frontier of every policy that meets
    some bound (and find_schedule's), the length distributions with the quantile marked, a run's timeline."""
    pytest.importorskip("matplotlib")
    from exegpt import plot, run_simulated

    w = Workload.task("C1")
    fig = plot.frontier_figure(w, [3.0, 6.0], model="llama-2-7b", devices="2xA100")
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert {"RRA", "continuous batching", "disaggregation", "find_schedule (the pick)"} <= set(labels)
    ys = {line.get_label(): np.asarray(line.get_ydata(), dtype=float) for line in ax.get_lines()}
    pick = ys.pop("find_schedule (the pick)")
    others = np.nanmax(np.vstack([y for name, y in ys.items() if not name.startswith("static")]), axis=0)
    assert np.allclose(pick, others)  # the pick is the best policy at every bound
    assert ax.get_xlabel().endswith("(s)") and ax.get_ylabel() == "throughput (seq/s)"
    fig = plot.lengths_figure(w, 0.99)
    assert any("p99 = " in t.get_text() for a in fig.axes for leg in [a.get_legend()] if leg for t in leg.get_texts())
    plan = find_schedule(w, 6.0, model="llama-2-7b", devices="1xA100", policies=["rra"])
    fig = plot.timeline_figure(run_simulated(plan, num_requests=20), max_requests=20)
    assert len(fig.axes[0].patches) == 60  # queued, prefill and decode bars of 20 requests
    out = tmp_path / "plan.json"
    plan.save(out)
    assert main(["plot", "timeline", "--plan", str(out), "--requests", "20", "-o", str(tmp_path / "t.png")]) == 0
    assert main(["plot", "lengths", "--task", "S", "-o", str(tmp_path / "l.png")]) == 0
    assert (tmp_path / "t.png").stat().st_size > 10_000 and (tmp_path / "l.png").stat().st_size > 10_000
    # A profile's curves: a line per TP degree and batch, within each table's measured range; the collectives.
    prof = make_profile()
    fig = plot.profile_figure(prof, batches=(1, 8))
    attn, dense, comm = fig.axes
    assert len(attn.get_lines()) == 2 * len(prof.tp_degrees()) and len(dense.get_lines()) == len(prof.tp_degrees())
    top = max(t.ys[-1] for t in prof.tables if t.kernel.value == "attn_decode")
    assert max(max(line.get_xdata()) for line in attn.get_lines()) <= top
    assert any("allreduce" in line.get_label() for line in comm.get_lines())
    # Predicted against measured: the points, the parity line, the noise band, the errors in the title.
    fig = plot.fidelity_figure([10.0, 20.0], [11.0, 18.0], labels=["a", "b"], band=0.3)
    ax = fig.axes[0]
    assert ax.collections and "mean error 10.0 %, max 10.0 %" in ax.get_title()
    with pytest.raises(ExeGPTError, match="equal-length lists"):
        plot.fidelity_figure([1.0], [1.0, 2.0])
