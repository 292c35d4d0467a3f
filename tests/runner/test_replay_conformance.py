"""The runner and the replay (``exegpt.replay``) follow one set of RRA rules (``exegpt.rules``): on the same
requests they build the same decode batches, whatever the steps cost."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from exegpt import Policy, Profile, RRASchedule, WAASchedule, Workload, evaluate_schedule
from exegpt.replay import replay
from runner.run import run_plan

PROFILE = Path(__file__).resolve().parents[1] / "data" / "tiny-cpu.json"


@pytest.mark.parametrize("encode_batch,decode_iters", [(2, 3), (4, 8), (3, 39)])
def test_replay_builds_the_runners_decode_batches(encode_batch, decode_iters):
    torch.set_num_threads(1)
    prof = Profile.load(PROFILE)
    w = Workload.truncated_normal(input=(24, 10, 48), output=(16, 8, 40))
    plan = evaluate_schedule(RRASchedule(encode_batch, decode_iters, 1, 0, 1), w, profile=prof, devices="1xcpu")
    rep = run_plan(plan, "tiny", num_requests=60, seed=5)
    rp = replay(plan, prof, num_requests=60, seed=5)
    assert rep.num_finished == rp.num_requests == 60
    # Rows per decode iteration and the steady window's phases depend on the rules only, not on timing.
    assert rp.decode_batch == rep.decode_batch
    assert rp.latency_len == rep.latency_len


def test_waa_replay_builds_the_runners_decode_batches():
    # The decode driver merges the next batch whenever it has room (waiting for it if need be) and runs every active
    # row once per iteration: rows per iteration follow from the rules, not the timing, on two ranks too.
    prof = Profile.load(PROFILE)
    w = Workload.truncated_normal(input=(24, 10, 48), output=(16, 8, 40))
    plan = evaluate_schedule(WAASchedule(Policy.WAA_C, 2, 8, 1, 0, 1, 1), w, profile=prof, devices="2xcpu")
    rep = run_plan(plan, "tiny", num_requests=60, seed=5)
    rp = replay(plan, prof, num_requests=60, seed=5)
    assert rep.num_finished == rp.num_requests == 60
    assert rp.decode_batch == rep.decode_batch
