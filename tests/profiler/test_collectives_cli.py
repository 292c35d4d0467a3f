"""Collectives in a real 2-process gloo group, and the CLI."""

import subprocess
import sys

import pytest

from exegpt.profile import Kernel
from profiler.__main__ import main
from profiler.collectives import measure_collectives


def test_gloo_collectives_with_two_processes():
    res = measure_collectives((1, 2), (64, 1 << 16), device="cpu", dtype="fp32", quick=True, probe_model="tiny")
    kinds = {(t.kernel, t.tp) for t in res.tables}
    assert kinds == {(Kernel.ALLREDUCE, 2), (Kernel.ALLTOALL, 2), (Kernel.ALLGATHER, 2), (Kernel.SEND_RECV, 1),
                     (Kernel.KV_HANDOFF, 1)}
    for t in res.tables:
        assert t.extrapolate and t.xs == (64.0, 65536.0)
        assert all(0 < s < 1.0 for s in t.seconds)
    assert res.facts == {"group2_backend": "gloo"} and not res.skipped
    slow = res.rank_slowdown[2]  # each rank's probe at once and in bursts, over alone and back to back
    assert slow["model"] == "tiny" and len(slow["per_rank"]) == 2
    assert all(0.2 < f < 10 for f in slow["per_rank"]) and slow["factor"] == pytest.approx(sum(slow["per_rank"]) / 2)
    # and back to back at once (the rank concurrency)
    assert len(slow["per_rank_concurrent"]) == 2 and all(0.2 < f < 10 for f in slow["per_rank_concurrent"])
    assert slow["concurrent"] == pytest.approx(sum(slow["per_rank_concurrent"]) / 2)


CHEAP = ["--quick", "--max-seq", "16", "--max-batch", "2", "--max-tokens", "8", "--no-collectives",
         "--no-progress", "--threads", "1"]


# The CLI writing a profile: tests/test_readme.py runs the README's own profiler command.


@pytest.mark.parametrize("args,match", [
    (["--model", "nope"], "unknown model"),
    (["--model", "tiny", "--tp", "3"], "TP degree 3 does not divide"),
    (["--model", "tiny", "--max-seq", "0"], "max_seq 0"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, args, match):
    assert main(CHEAP + args + ["-o", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and "\n" not in err and "Traceback" not in err


def test_cli_unwritable_output(tmp_path, capsys):
    assert main(["--model", "tiny", "-o", str(tmp_path / "missing" / "p.json")] + CHEAP) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--model", "tiny", "-o", str(tmp_path)] + CHEAP) == 2
    assert "is a directory" in capsys.readouterr().err


def test_cli_process_exits_2_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "profiler", "--model", "nope", "-o", str(tmp_path / "p.json")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "unknown model" in r.stderr
    r = subprocess.run([sys.executable, "-m", "profiler", "--model", "tiny", "--tp", "x", "-o", "p.json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
