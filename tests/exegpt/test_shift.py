"""Shift Parallelism as a policy: the mode rule, the collectives in the cost, the four configurations on the
simulated engine (every request accounted for), the estimate's modes, and bad input."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from exegpt import Arrivals, Plan, Workload, evaluate_schedule, find_schedule, run_simulated
from exegpt.errors import ExeGPTError
from exegpt.policies import base, describe, schedule_from_dict
from exegpt.policies.chunked import ChunkedSchedule
from exegpt.policies.shift import ShiftSchedule, parse
from exegpt.profile import Kernel, ProfileTable
from exegpt.report import FINISHED
from exegpt.schedule import schedule_to_dict
from exegpt.stages import decode_times

W = Workload.trace("azure_code").within_context(4096, how="clip")[0]
MODEL, DEVICES = "llama-2-13b", "8xH100"


def four(threshold: int = 512) -> dict[str, ShiftSchedule]:
    return {"TP": ShiftSchedule(2304, 256, 1, 8, threshold, 1, 8),
            "DP": ShiftSchedule(2304, 256, 1, 1, threshold, 8, 8),
            "SP": ShiftSchedule(2304, 256, 8, 1, 1, 1, 8), "Shift": ShiftSchedule(2304, 256, 8, 1, threshold, 1, 8)}


def _tokens(action) -> int:
    if isinstance(action, base.Decode):
        return sum(len(mb) for mb in action.micro_batches)
    if isinstance(action, base.Chunk):
        return sum(n for _, _, n in action.items)
    return -1  # a resumed prefill: its tokens are not in the log


def test_four_configurations_under_bursty_arrivals():
    """Every request finishes once; each forward runs in the base mode exactly when its tokens reach the threshold;
    one request alone: Shift's TTFT is SP's and its TPOT TP's (the paper's claim at low load)."""
    alone = {}
    for name, s in four(512).items():
        plan = evaluate_schedule(s, W, model=MODEL, devices=DEVICES)
        rep = run_simulated(plan, num_requests=300, arrivals=Arrivals.trace(4.0), log_decisions=True)
        assert rep.num_finished == 300 and all(r.status == FINISHED for r in rep.requests)
        assert sorted(r.id for r in rep.requests) == list(range(300))
        modes = set()
        for line in rep.decisions:
            text = line.split(" -> ")[0].split(" ", 1)[1]
            if not text.startswith(("Decode", "Chunk")):
                continue
            action = eval(text, vars(base))  # the logged action, rebuilt
            modes.add(action.sp)
            assert action.sp == (s.sp > 1 and _tokens(action) >= s.threshold), line
        assert modes == {"TP": {False}, "DP": {False}, "SP": {True}, "Shift": {False, True}}[name]
        one = run_simulated(plan, num_requests=12, arrivals=Arrivals.poisson(0.01))
        alone[name] = (one.ttft.p50, one.tpot.p50)
    # Shift's TTFT at most SP's (its small prompts and last chunks run shifted, faster than SP's padded ones)
    assert alone["Shift"][0] <= 1.05 * alone["SP"][0] and alone["Shift"][0] < alone["TP"][0]
    assert alone["Shift"][1] == pytest.approx(alone["TP"][1], rel=0.01) and alone["Shift"][1] < alone["SP"][1]
    assert alone["DP"][0] > alone["TP"][0]


def test_all_to_all_and_all_gather_are_in_the_cost():
    """A base-mode decode step costs exactly two all-to-alls a layer and one all-gather more than its tables
    without them: raising each table by d raises the step by 2 L d and d."""
    plan = evaluate_schedule(four()["SP"], W, model=MODEL, devices=DEVICES)
    from exegpt.sim import plan_problem

    prob, lay = plan_problem(plan, None)
    stage = lay.stages[0]
    rows = np.array([1.0, 64.0, 300.0])

    def step(extra_a2a: float, extra_ag: float):
        tables = [ProfileTable(k, 8, (1.0, 1e12), (), (d, d + 1e-12), extrapolate=True)
                  for k, d in ((Kernel.ALLTOALL, extra_a2a), (Kernel.ALLGATHER, extra_ag))]
        prof = dataclasses.replace(prob.profile, tables=prob.profile.tables + tuple(tables))
        cost = dataclasses.replace(prob.cost, profile=prof)
        return decode_times(prob, (stage,), rows, cost=cost, base=True)[0][0]

    zero = step(0.0, 0.0)
    assert step(1e-3, 0.0) - zero == pytest.approx(np.full(3, 2 * stage.n_layers * 1e-3))
    assert step(0.0, 1e-3) - zero == pytest.approx(np.full(3, 1e-3))
    tp = decode_times(prob, (dataclasses.replace(stage, sp=1),), rows)[0][0]
    assert (decode_times(prob, (stage,), rows)[0][0] == tp).all()  # TP mode ignores the SP degree


def test_estimate_modes_and_replicas():
    est = {k: evaluate_schedule(s, W, model=MODEL, devices=DEVICES).estimate for k, s in four().items()}
    chunked = evaluate_schedule(ChunkedSchedule(2304, 256, 8, 8, 8), W, model=MODEL, devices=DEVICES).estimate
    assert est["TP"].throughput_seq_s == pytest.approx(chunked.throughput_seq_s)
    one = evaluate_schedule(ShiftSchedule(2304, 256, 1, 1, 512, 1, 1), W, model=MODEL, devices="1xH100").estimate
    assert est["DP"].throughput_seq_s == pytest.approx(8 * one.throughput_seq_s)
    # Both weight shards on every device: less KV room than TP alone.
    assert est["Shift"].kv_tokens < est["TP"].kv_tokens
    assert est["TP"].throughput_seq_s < est["SP"].throughput_seq_s <= est["Shift"].throughput_seq_s
    huge = evaluate_schedule(ShiftSchedule(2304, 256, 8, 1, 10 ** 9, 1, 8), W, model=MODEL, devices=DEVICES)
    assert huge.estimate.decode_step_s == pytest.approx(est["TP"].decode_step_s)


def test_searched_saved_and_parsed():
    plan = find_schedule(W, math.inf, model=MODEL, devices="2xH100", policies=("shift",))
    assert plan.schedule.policy.value == "shift" and Plan.from_json(plan.to_json()) == plan
    assert plan.stages[0].sp == plan.schedule.sp and plan.stages[0].tp == plan.schedule.ranks
    s = parse("shift", {"threshold": 256}, 8)
    assert (s.sp, s.tp, s.replicas, s.threshold) == (8, 1, 1, 256)
    assert schedule_from_dict(schedule_to_dict(s)) == s
    assert [describe(x) for x in four().values()] == [
        "shift TP8 T=2304 S=256", "shift DP8 T=2304 S=256", "shift SP8xTP1 always T=2304 S=256",
        "shift SP8xTP1 >=512 T=2304 S=256"]


@pytest.mark.parametrize("make,match", [
    (lambda: ShiftSchedule(2304, 256, 8, 1, 0, 1, 8), r"threshold=0 must be a whole number of step tokens >= 1"),
    (lambda: ShiftSchedule(2304, 256, 4, 1, 512, 1, 8), r"replicas=1 x sp=4 x tp=1 must equal the 8 devices"),
    (lambda: evaluate_schedule(ShiftSchedule(2304, 256, 3, 1, 512, 1, 3), W, model="llama-2-70b",
                               devices="3xH100"),
     r"TP degree 3 must divide llama-2-70b's 64 heads and 8 KV heads, or the profile must time that uneven split"),
    (lambda: evaluate_schedule(ShiftSchedule(2304, 256, 16, 1, 512, 1, 16), W, model="llama-2-70b",
                               devices="16xH100"),
     r"16 devices do not split llama-2-70b's 64 query and 8 KV heads into whole GQA groups; SP x TP must be one of "
     r"\[1, 2, 3, 4, 5, 6, 7, 8\]"),
    (lambda: evaluate_schedule(ShiftSchedule(64, 8, 2, 1, 16, 1, 2), Workload.task("S"), model="t5-11b",
                               devices="2xA100"), r"runs decoder-only models, not t5-11b"),
])
def test_bad_input_is_one_line(make, match):
    with pytest.raises(ExeGPTError, match=match) as e:
        make()
    assert "\n" not in str(e.value)


def test_no_all_to_all_is_one_line():
    """SP over 4 devices of an (SP 4, TP 2) base on a profile with all-reduces at 2 and 8 devices only."""
    from exegpt.problem import problem

    prof = problem(W, math.inf, model="llama-2-70b", devices=DEVICES).profile
    prof = dataclasses.replace(prof, tables=tuple(t for t in prof.tables
                                                  if not (t.kernel is Kernel.ALLREDUCE and t.tp == 4)))
    with pytest.raises(ExeGPTError, match=r"has no all-to-all \(nor all-reduce\) table for a group of 4 devices"):
        evaluate_schedule(ShiftSchedule(2304, 256, 4, 2, 512, 1, 8), W, model="llama-2-70b", devices=DEVICES,
                          profile=prof)


def test_uneven_heads_price_the_most_loaded_rank():
    """SmolLM2's 9 query and 3 KV heads on 2 ranks go 6 + 3 and 2 + 1: the degrees allowed, the KV bytes of the
    rank with 2 KV heads, and all-to-alls priced as if every rank held its 2 KV and 6 query heads."""
    from exegpt.models import MODELS, kv_shares
    from exegpt.policies.shift import split_degrees
    from exegpt.problem import problem

    smol = MODELS["smollm2-135m"]
    assert split_degrees(9, 3) == [1, 2, 3] and kv_shares(3, 2) == (2, 1) and kv_shares(40, 8) == (5,) * 8
    assert smol.kv_bytes_per_token(2) == smol.kv_bytes_per_token(1) * 2 / 3
    assert smol.valid_split(2) and not smol.valid_tp(2) and not smol.valid_split(4)
    prob = problem(W, math.inf, model=MODEL, devices=DEVICES)
    a2a = ProfileTable(Kernel.ALLTOALL, 2, (1.0, 1e12), (), (1e-9, 1e3), extrapolate=True)  # 1 ns a byte
    cost = dataclasses.replace(prob.cost, model=smol,
                               profile=dataclasses.replace(prob.profile, tables=prob.profile.tables + (a2a,)))
    per, elems = 10, smol.hd * smol.dtype_bytes
    got, ok = cost.ulysses_comm(2, 2, 2 * per)
    # each rank's send buffers: its tokens' q, k, v, then attention outputs, for SP = 2 ranks' worth of its heads
    assert ok and got == pytest.approx(1e-9 * per * 2 * ((6 + 2 + 2) + 6) * elems)


def test_measured_base_mode_layer_replaces_the_composition():
    """With ``sp_encode`` / ``sp_decode`` tables (the profiler's timed Ulysses layer), a base-mode layer costs its
    measured rest (the measurement less its attention, linear in tokens) plus the step's own attention; without
    them, the kernel-table composition."""
    from exegpt import ulysses_cost
    from exegpt.problem import problem

    prob = problem(W, math.inf, model=MODEL, devices=DEVICES)
    cost = prob.cost
    toks, rows, ctxs = np.array([64.0, 512.0, 2048.0]), np.array([1.0, 16.0, 64.0]), np.array([128.0, 1024.0])
    attn_e, _ = cost._get(Kernel.ATTN_ENCODE, 8, np.ones(3), toks)
    b, c = np.meshgrid(rows, ctxs, indexing="ij")
    attn_d, _ = cost._get(Kernel.ATTN_DECODE, 8, b, c)
    enc = ProfileTable(Kernel.SP_ENCODE, 8, tuple(toks), (), tuple(attn_e + 1e-6 * toks), extrapolate=True)
    dec = ProfileTable(Kernel.SP_DECODE, 8, tuple(rows), tuple(ctxs), tuple(map(tuple, attn_d + 2e-5 * b)),
                       extrapolate=True)
    measured = dataclasses.replace(cost, profile=dataclasses.replace(prob.profile,
                                                                     tables=prob.profile.tables + (enc, dec)))
    assert ulysses_cost.has_measured(measured, 8, 8) and not ulysses_cost.has_measured(cost, 8, 8)
    assert not ulysses_cost.has_measured(measured, 4, 8)  # a (4, 2) base: composed
    r = np.array([1.0, 30.0, 200.0])
    want, _ = cost._get(Kernel.ATTN_DECODE, 8, r, np.full(3, 500.0))
    got, ok = measured.decode_layer(8, r, ctx=500.0, sp=8)
    assert ok.all() and got == pytest.approx(want + 2e-5 * r)
    composed, _ = cost.decode_layer(8, r, ctx=500.0, sp=8)
    assert not np.allclose(composed, got)
    batch = np.array([1.0, 4.0])
    attn, _ = cost._prompt_attention(8, batch)
    got, ok = measured.encode_layer(8, batch, sp=8)
    assert ok.all() and got == pytest.approx(attn + 1e-6 * batch * cost.stats.in_mean)
    points = ulysses_cost.composed_vs_measured(measured, 8)
    assert len(points) == 3 + 6 and all(m > 0 and c > 0 for _, c, m in points)
