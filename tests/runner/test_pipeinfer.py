"""PipeInfer's executor when things go wrong: a dead rank ends the run with its name (the head never waits on
it), and a drafter of another vocabulary is refused before any rank starts. (Its tokens, decisions and
cancellations: ``test_engines_conformance``.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from exegpt import Profile, Workload, evaluate_schedule
from exegpt.errors import ExeGPTError
from exegpt.policies.pipeinfer import PipeInferSchedule
from runner.launch import RankFailedError
from runner.run import run_plan

PROFILE = Path(__file__).resolve().parents[1] / "data" / "tiny-cpu.json"
W = Workload.truncated_normal(input=(24, 10, 48), output=(20, 8, 40))


def _plan(s: PipeInferSchedule):
    return evaluate_schedule(s, W, profile=Profile.load(PROFILE), devices=f"{s.num_gpus}xcpu")


def test_a_dead_rank_ends_the_run_and_a_foreign_drafter_is_refused():
    torch.set_num_threads(1)
    plan = _plan(PipeInferSchedule("pipeinfer", 1, 2, n_draft=4, draft="ngram:1"))  # the drafter on rank 1
    with pytest.raises(RankFailedError, match="rank 1"):
        run_plan(plan, "tiny", num_requests=2, seed=3, fault=(1, 3), timeout_s=120)
    foreign = _plan(PipeInferSchedule("pipeinfer", 2, 3, draft="model:small"))
    with pytest.raises(ExeGPTError, match="vocabulary of 2048 tokens, the target 'tiny' 256"):
        run_plan(foreign, "tiny", num_requests=2)
