"""Drift on the runner: the output lengths shift halfway through a run of the tiny model; the monitor detects it
after the same requests as on the simulated engine, the re-plan runs on a thread while the driver runs on, and the
driver takes the cheap move between two phases, with every request served in full."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from exegpt import Profile, RRASchedule, Workload, evaluate_schedule, run_simulated
from exegpt.replan import DriftOptions, rescaled
from runner.requests import requests_from_pairs
from runner.run import run_plan

PROFILE = Path(__file__).resolve().parents[1] / "data" / "tiny-cpu.json"
W = Workload.truncated_normal(input=(24, 8, 48), output=(32, 4, 64))
HALF = 128


def test_the_runner_detects_drift_and_applies_the_cheap_move_live():
    torch.set_num_threads(1)
    prof = Profile.load(PROFILE)
    plan = evaluate_schedule(RRASchedule(36, 41, 1, 0, 1), W, 0.0681, profile=prof, devices="1xcpu")
    nd = plan.schedule.decode_iters
    for factor in (1.0, 1.15, 0.7):
        rng = np.random.default_rng(1)
        w2 = Workload(W.input_len, rescaled(W.output_len, factor, W.output_len.max))
        pairs = np.concatenate([W.sample(HALF, rng, joint=False), w2.sample(HALF, rng, joint=False)])
        opts = DriftOptions(profile=prof, full_replan=factor > 1)
        rep = run_plan(plan, "tiny", requests=requests_from_pairs(pairs, 256), drift=opts, log_decisions=True)
        sim = run_simulated(plan, prof, lengths=pairs, drift=DriftOptions(profile=prof, full_replan=False))
        # No request lost: each one finished with every token it asked for.
        assert rep.num_finished == 2 * HALF and all(r.num_generated == o for r, (_, o) in zip(rep.requests, pairs))
        if factor == 1.0:
            assert rep.drift == () == sim.drift
            continue
        drift, ref = rep.drift[0], sim.drift[0]
        # Detected after the same requests as on the simulated engine (the same decisions until then), within 64
        # shifted ones; the runner's move was found on a thread in under a second and taken at a later phase.
        assert (drift.kind, drift.observed, drift.change_at, drift.after) == (ref.kind, ref.observed, ref.change_at,
                                                                              ref.after)
        assert 0 < drift.observed - HALF <= 64 and drift.move_s < 1.0
        assert drift.detected_s <= drift.applied_s < rep.makespan_s and bool(drift.full) == (factor > 1)
        new_nd = int(re.search(r"N_D=(\d+)", drift.after).group(1))
        iters = [int(m) for m in re.findall(r"max_iters=(\d+)", " ".join(rep.decisions))]
        k = iters.index(new_nd)  # the phases before the move ran the old N_D, every phase after it the new one
        assert new_nd != nd and set(iters[:k]) == {nd} and set(iters[k:]) == {new_nd}
        if factor > 1:
            assert drift.old_latency_s > drift.bound_s >= drift.new_latency_s
        else:
            assert drift.new_throughput_seq_s > drift.old_throughput_seq_s and drift.new_keeps_bound
