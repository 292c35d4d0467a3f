"""PipeInfer on gloo ranks (two target stages and a drafter): every knob setting's tokens are the target's greedy
tokens, rejections cancel runs in flight and roll back their KV on every stage, a dead rank ends the run with
its name, and a drafter of another vocabulary is refused before any rank starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from exegpt import Profile, Workload, evaluate_schedule
from exegpt.errors import ExeGPTError
from exegpt.policies.pipeinfer import PipeInferSchedule
from runner.dist import RankFailedError
from runner.generate import greedy_reference
from runner.requests import make_requests
from runner.run import run_plan, run_plans
from runner.weights import load_model

PROFILE = Path(__file__).resolve().parents[1] / "data" / "tiny-cpu.json"
W = Workload.truncated_normal(input=(24, 10, 48), output=(20, 8, 40))
N, SEED = 3, 3


def _plan(s: PipeInferSchedule):
    return evaluate_schedule(s, W, profile=Profile.load(PROFILE), devices=f"{s.num_gpus}xcpu")


def test_lossless_cancellations_and_rollback():
    torch.set_num_threads(1)
    scheds = [PipeInferSchedule("sync", 2, 3, n_draft=1, draft="layers:1"),
              PipeInferSchedule("pipeinfer", 2, 3, n_draft=8, depth=2, draft="layers:1", link_delay_s=0.002),
              PipeInferSchedule("pipeinfer", 2, 3, n_draft=4, cutoff=0.02, depth=2, draft="model:tiny")]
    reps = run_plans([_plan(s) for s in scheds], "tiny", num_requests=N, seed=SEED, keep_tokens=True,
                     timeout_s=300)
    model, args, _ = load_model("tiny", seed=SEED)
    ref = {r.id: tuple(greedy_reference(model, list(r.prompt), r.output_len))
           for r in make_requests(W, N, args.vocab_size, SEED)}
    for s, rep in zip(scheds, reps):
        sp = rep.speculation
        assert rep.num_finished == N and {r.id: r.tokens for r in rep.requests} == ref, (s, sp)
        assert 0 <= sp["accepted"] <= sp["verified"] <= sp["drafted"] and sp["runs"] >= sp["spec_runs"] > 0, (s, sp)
        assert sp["drafter"]["calls"] > 0
    rejecting = reps[1].speculation  # a one-layer self-draft of a random model: most drafts rejected
    assert rejecting["cancelled"] > 0 and rejecting["acceptance"] < 0.9
    later = rejecting["stages"][1]  # every run reaches it: computed, skipped, or stopped mid-way (timing decides)
    assert later["runs"] + later["skipped"] + later["aborted"] == rejecting["runs"] + N
    assert all(st["rolled_back"] > 0 for st in rejecting["stages"])  # rejected KV reset on every stage
    assert reps[2].speculation["acceptance"] == 1.0  # the target itself as its drafter: every draft agrees
    assert reps[0].speculation["cancelled"] == 0  # synchronous speculation has nothing in flight to cancel


def test_a_dead_rank_ends_the_run_and_a_foreign_drafter_is_refused():
    torch.set_num_threads(1)
    plan = _plan(PipeInferSchedule("pipeinfer", 1, 2, n_draft=4, draft="ngram:1"))  # the drafter on rank 1
    with pytest.raises(RankFailedError, match="rank 1"):
        run_plan(plan, "tiny", num_requests=2, seed=SEED, fault=(1, 3), timeout_s=120)
    foreign = _plan(PipeInferSchedule("pipeinfer", 2, 3, draft="model:small"))
    with pytest.raises(ExeGPTError, match="vocabulary of .* tokens, the target 'tiny' 256"):
        run_plan(foreign, "tiny", num_requests=2)
