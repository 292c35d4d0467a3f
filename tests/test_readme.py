"""Every command of the README's command-line tour runs as printed (in a scratch folder, on small settings: fewer
requests, smaller searches, a cheaper profiler grid), so the README cannot drift from the software."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "tests" / "data" / "tiny-cpu.json"
PAPER = ["rra", "waa_c", "waa_m"]
CHEAP_PROFILER = ["--max-seq", "16", "--max-batch", "2", "--max-tokens", "8", "--no-collectives", "--no-progress",
                  "--threads", "1"]


def tour() -> list[str]:
    """The lines of the README's ``Command line:`` block."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"Command line:\n\n```bash\n(.*?)```", text, re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip()]


def _cheaper(argv: list[str]) -> list[str]:
    """Small settings: at most 24 requests a run, searches on the simulated engine of 100 requests and 2 candidates,
    a frontier of two bounds."""
    out = list(argv)
    for i, a in enumerate(out[:-1]):
        if a == "--requests":
            out[i + 1] = str(min(int(out[i + 1]), 24))
    if any(a in out for a in ("--ttft", "--completion")):
        out += ["--sim-requests", "100", "--max-simulated", "2"]
    if out[1:3] == ["plot", "frontier"]:
        out += ["--bounds", "4", "8"]
    return out


def test_every_command_of_the_readme_tour_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    from exegpt import Profile
    from exegpt.__main__ import main as exegpt_main
    from profiler.__main__ import main as profiler_main
    from runner.__main__ import main as runner_main

    monkeypatch.chdir(tmp_path)
    commands = tour()
    assert len(commands) >= 12 and any(c.startswith("python -m runner") for c in commands)
    for line in commands:
        argv = _cheaper(shlex.split(line, comments=True))
        if argv[0] == "exegpt":
            code = exegpt_main(argv[1:])
        elif argv[:3] == ["python", "-m", "profiler"]:
            code = profiler_main(argv[3:] + CHEAP_PROFILER)
            out = argv[argv.index("-o") + 1]
            prof = Profile.load(out)
            assert prof.model == "tiny" and prof.tp_degrees() == (1, 2)
            shutil.copy(PROFILE, out)  # the plans below need its collectives too
        elif argv[:3] == ["python", "-m", "runner"]:
            code = runner_main(argv[3:] + ["--no-progress"])
        else:
            raise AssertionError(f"the README's tour holds a command this test does not know: {line}")
        assert code == 0, line
    out = capsys.readouterr().out
    assert "requests: 24 finished, 0 failed" in out
    for png in ("frontier.png", "profile.png"):
        assert (tmp_path / png).stat().st_size > 10_000


def python_tour() -> str:
    """The README's ``Using it`` Python block."""
    text = (ROOT / "README.md").read_text()
    return re.search(r"## Using it\n\n```python\n(.*?)```", text, re.S).group(1)


def test_the_readme_python_tour_runs(tmp_path, monkeypatch):
    """The README's Python block runs as printed, in a scratch folder whose ``trace.csv`` is a shipped trace, on
    small settings: searches over the paper's policies and continuous batching in a smaller space, simulated runs
    of at most 300 requests, and the simulated searches of SLO forms (b) and (c) on 100 requests and 2
    candidates."""
    import gzip

    import exegpt
    from exegpt.search.goodput import SimulatedSearch

    monkeypatch.chdir(tmp_path)
    with gzip.open(ROOT / "exegpt" / "data" / "traces" / "azure_conv.csv.gz") as f:
        (tmp_path / "trace.csv").write_bytes(f.read())
    small = dict(space=exegpt.SearchSpace(max_encode_batch=32, max_micro_batch=32))
    calls = []

    def smaller(fn, **fixed):
        def call(*args, **kw):
            calls.append(fn.__name__)
            return fn(*args, **{**fixed, **kw})
        return call

    monkeypatch.setattr(exegpt, "find_schedule", smaller(exegpt.find_schedule, **small, policies=PAPER + ["cb"],
                                                         simulated=SimulatedSearch(num_requests=100, max_simulated=2)))
    monkeypatch.setattr(exegpt, "exhaustive_schedule", smaller(exegpt.exhaustive_schedule, **small,
                                                               policies=PAPER))
    real_run = exegpt.run_simulated
    monkeypatch.setattr(exegpt, "run_simulated", lambda plan, **kw: real_run(
        plan, **{**kw, "num_requests": min(kw.get("num_requests", 300), 300)}))
    scope: dict = {}
    exec(compile(python_tour(), "README.md", "exec"), scope)
    assert calls.count("find_schedule") == 5 and calls.count("exhaustive_schedule") == 1
    assert scope["plan"].slo_check.holds and scope["plan"].slo_check.goodput_rps > 0
    assert scope["best"].estimate.throughput_seq_s > 0 and scope["r"].num_requests == 300
    assert (tmp_path / "plan.json").exists()
