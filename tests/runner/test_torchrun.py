"""Across machines: two torchrun agents (``--nnodes 2 --nproc-per-node 1``, c10d rendezvous on localhost, as two
machines would run them) execute a pipeline plan and a TP plan, sharing one set of processes, to every request's
single-process greedy tokens."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

from exegpt import Estimate, LatencyBound, Plan, RRASchedule, Stage, Workload
from exegpt.report import FINISHED, RunReport
from runner.generate import greedy_reference
from runner.requests import make_requests
from runner.tp import free_port
from runner.weights import load_model

ROOT = Path(__file__).resolve().parents[2]
WORKLOAD = Workload.truncated_normal((12, 5, 20), (8, 4, 16))
N = 6
JOB = """
import sys
from exegpt import Plan
from runner.requests import make_requests
from runner.run import run_plans
from runner.weights import load_model

plans = [Plan.load(p) for p in sys.argv[1:-1]]
_, args, _ = load_model("tiny")
reqs = make_requests(plans[0].workload, {n}, vocab_size=args.vocab_size, seed=5)
reports = run_plans(plans, "tiny", requests=reqs, keep_tokens=True, timeout_s=120)
if reports[0] is not None:  # the rank that holds the reports
    for i, rep in enumerate(reports):
        rep.save(f"{{sys.argv[-1]}}{{i}}.json")
""".format(n=N)


def _plan(schedule, stages) -> Plan:
    est = Estimate(throughput_seq_s=10.0, throughput_tok_s=80.0, latency_s=1.0, latency_len=8, encode_stage_s=0.01,
                   decode_step_s=0.005, decode_batch=6.0)
    return Plan(schedule=schedule, estimate=est, bound=LatencyBound(10.0), profile_id="tiny@cpu", model="tiny",
                devices="2xCPU", workload=WORKLOAD, stages=stages)


def _agents(tmp_path: Path, argv: list[str]) -> list[subprocess.CompletedProcess]:
    """Two torchrun agents started separately, meeting at a c10d rendezvous on localhost."""
    common = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
              "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id",
              uuid.uuid4().hex[:8], "--max-restarts", "0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(common + argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    out = []
    for p in procs:
        text, _ = p.communicate(timeout=240)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, text))
    return out


def test_two_torchrun_agents_run_a_pipeline_and_a_tp_plan_to_the_greedy_tokens(tmp_path):
    pp = _plan(RRASchedule(3, 4, 1, 0, 2), (Stage("both", 1, 0, 1), Stage("both", 1, 1, 1)))
    tp = _plan(RRASchedule(3, 4, 2, 2, 2), (Stage("both", 2, 0, 2),))
    pp.save(tmp_path / "pp.json")
    tp.save(tmp_path / "tp.json")
    (tmp_path / "job.py").write_text(JOB)
    for p in _agents(tmp_path, ["job.py", "pp.json", "tp.json", "report"]):
        assert p.returncode == 0, p.stdout[-2000:]

    model, args, _ = load_model("tiny")
    reqs = make_requests(WORKLOAD, N, vocab_size=args.vocab_size, seed=5)
    reference = {r.id: greedy_reference(model, list(r.prompt), r.output_len) for r in reqs}
    for i in range(2):
        rep = RunReport.load(tmp_path / f"report{i}.json")
        assert sorted(r.id for r in rep.requests) == sorted(reference)
        for rec in rep.requests:
            assert rec.status == FINISHED and list(rec.tokens) == reference[rec.id], f"plan {i}, request {rec.id}"
