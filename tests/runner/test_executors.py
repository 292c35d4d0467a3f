"""Plan executors: every schedule reproduces each request's greedy tokens, loses nothing, fails cleanly.

Single-process cases run in-process; multi-process ones (gloo, 2 ranks) are marked slow but run by default.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time

import pytest
import torch

from exegpt.errors import ExeGPTError
from exegpt.policies import policy_module
from exegpt.policies.cb import CBSchedule
from exegpt.policies.chunked import ChunkedSchedule
from exegpt.policies.disagg import DisaggSchedule
from exegpt import Estimate, LatencyBound, Plan, Policy, RRASchedule, Stage, StaticSchedule, WAASchedule, Workload
from runner import numerics
from runner.launch import Fault, RankFailedError
from runner.generate import greedy_reference
from exegpt.report import FAILED, FINISHED
from runner.requests import Request, make_requests, requests_from_pairs
from exegpt.rules import SteadyStop, rra_refill_target as refill_target
from runner.run import check_stages, remap_stages, run_plan, run_plans
from runner.weights import load_model

WORKLOAD = Workload.truncated_normal((12, 5, 20), (8, 4, 16))  # cache_len = 20 + 16 = 36
ONE = (Stage("both", 1, 0, 2),)
PP2 = (Stage("both", 1, 0, 1), Stage("both", 1, 1, 1))


def make_plan(schedule, stages=ONE, decode_batch: float = 6.0, latency_len: int = 8) -> Plan:
    est = Estimate(throughput_seq_s=10.0, throughput_tok_s=80.0, latency_s=1.0, latency_len=latency_len,
                   encode_stage_s=0.01, decode_step_s=0.005, decode_batch=decode_batch)
    return Plan(schedule=schedule, estimate=est, bound=LatencyBound(10.0), profile_id="tiny@cpu", model="tiny",
                devices=f"{schedule.num_gpus}xCPU", workload=WORKLOAD, stages=stages)


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    m, _, _ = load_model("tiny")
    return m


@pytest.fixture(scope="module")
def requests():
    return make_requests(WORKLOAD, 14, vocab_size=256, seed=3)


@pytest.fixture(scope="module")
def reference(model, requests):
    return {r.id: greedy_reference(model, list(r.prompt), r.output_len) for r in requests}


def assert_complete(report, requests, reference=None):
    """Conservation: every request exactly once, finished with its greedy tokens (or failed with a reason)."""
    ids = [r.id for r in report.requests]
    assert sorted(ids) == sorted(r.id for r in requests)
    assert len(set(ids)) == len(ids)
    assert report.num_finished + report.num_failed == len(requests)
    for rec in report.requests:
        if rec.status == FAILED:
            assert rec.reason
            continue
        assert rec.status == FINISHED
        assert rec.encode_start_s <= rec.first_token_s <= rec.finish_s
        if reference is not None:
            assert list(rec.tokens) == reference[rec.id], f"request {rec.id}"
            assert rec.num_generated == rec.output_len


# --- single process ------------------------------------------------------------------------------


@pytest.mark.parametrize("encode_batch,decode_iters,decode_batch", [(1, 1, 1.0), (4, 3, 6.0), (3, 7, 9.0),
                                                                    (14, 2, 14.0)])
def test_rra_tokens_match_reference(requests, reference, encode_batch, decode_iters, decode_batch):
    plan = make_plan(RRASchedule(encode_batch, decode_iters, 1, 0, 1), decode_batch=decode_batch)
    rep = run_plan(plan, "tiny", requests=requests, keep_tokens=True)
    assert_complete(rep, requests, reference)
    assert rep.num_finished == len(requests)
    # The refill rule never lets the decode batch grow past round(decode_batch).
    assert 0 < rep.decode_batch <= refill_target(plan)
    assert rep.throughput_seq_s > 0 and rep.decode_step_s > 0 and rep.encode_stage_s > 0


def test_a_steady_stop_ends_the_run_once_its_window_is_in(model):
    """A measurement run (``SteadyStop``): it ends at the first phase boundary whose steady window holds 2 phases
    and 20 finishes; the window is the report's, the requests still running or queued are failed with a reason, the
    finished ones carry their greedy tokens. Only RRA plans end so."""
    reqs = make_requests(WORKLOAD, 90, vocab_size=256, seed=4)
    plan = make_plan(RRASchedule(2, 2, 1, 0, 1), decode_batch=6.0)
    rep = run_plan(plan, "tiny", requests=reqs, keep_tokens=True, steady_stop=SteadyStop())
    done = [r for r in rep.requests if r.status == FINISHED]
    assert_complete(rep, reqs, {r.id: greedy_reference(model, list(r.prompt), r.output_len) for r in reqs
                                if r.id in {d.id for d in done}})
    assert 20 <= len(done) < 40 and rep.num_failed == 90 - len(done)
    assert rep.steady_start_s < rep.steady_end_s <= max(r.finish_s for r in done) + 1.0
    assert sum(rep.steady_start_s <= r.finish_s <= rep.steady_end_s for r in done) >= 20
    with pytest.raises(ExeGPTError, match="steady stop finishes 5 must be a whole number >= 20"):
        SteadyStop(finishes=5)
    with pytest.raises(ExeGPTError, match="a steady stop ends runs of rra plans"):
        run_plan(make_plan(StaticSchedule(5, 1, 1)), "tiny", requests=reqs, steady_stop=SteadyStop())


def test_rra_refills_as_many_as_finished(model):
    """B_E = 2, N_D = 1, refill target 6: six queries admitted over three phases all finish in the same phase;
    the next phase admits all six of the waiting ones (in three chunks of B_E), not B_E."""
    lens = [5, 5, 4, 4, 3, 3] + [2] * 6  # phase a admits queries ending a + len - 2: all of the first six in phase 5
    reqs = [Request(i, (1 + i, 2, 3), n) for i, n in enumerate(lens)]
    plan = make_plan(RRASchedule(2, 1, 1, 0, 1), decode_batch=6.0)
    rep = run_plan(plan, "tiny", requests=reqs, keep_tokens=True)
    assert_complete(rep, reqs, {r.id: greedy_reference(model, list(r.prompt), r.output_len) for r in reqs})
    late = [rec for rec in rep.requests if rec.id >= 6]
    assert max(r.first_token_s for r in late) < min(r.finish_s for r in late)
    first = [rec for rec in rep.requests if rec.id < 6]
    assert max(r.finish_s for r in first) < min(r.encode_start_s for r in late)


@pytest.mark.parametrize("batch", [1, 5, 14])
def test_static_tokens_match_reference(requests, reference, batch):
    rep = run_plan(make_plan(StaticSchedule(batch, 1, 1)), "tiny", requests=requests, keep_tokens=True)
    assert_complete(rep, requests, reference)
    # Finished rows keep occupying the batch: every iteration computes all of its rows.
    batches = [requests[i:i + batch] for i in range(0, len(requests), batch)]
    iters = [max(r.output_len for r in b) - 1 for b in batches]
    rows = sum(len(b) * n for b, n in zip(batches, iters))
    assert rep.decode_batch == pytest.approx(rows / sum(iters))


def test_t5_plans_of_rra_and_static_match_the_reference():
    """T5 (``tiny-t5``) on one rank: each prefill runs the encoder and the decoder's first step; RRA and static
    batching give every request its greedy tokens. Other policies and more ranks are one line each."""
    t5, args, _ = load_model("tiny-t5")
    reqs = make_requests(WORKLOAD, 10, vocab_size=args.vocab_size, seed=4)
    ref = {r.id: greedy_reference(t5, list(r.prompt), r.output_len) for r in reqs}
    stages = (Stage("both", 1, 0, 2, 0, 2),)
    plans = [make_plan(RRASchedule(3, 4, 1, 0, 1), stages), make_plan(StaticSchedule(4, 1, 1), stages)]
    for rep in run_plans(plans, "tiny-t5", requests=reqs, keep_tokens=True):
        assert_complete(rep, reqs, ref)
    with pytest.raises(ExeGPTError, match=r"T5 runs one-device plans of rra or static on the runner .* this plan is "
                                          r"cb on 1 devices"):
        run_plan(make_plan(CBSchedule(4, 64, 1, 0, 1), stages), "tiny-t5", requests=reqs)


def test_static_keeps_finished_rows_rra_drops_them(requests):
    """Static computes every row until the longest request ends; RRA's rows drop out when done."""
    static = run_plan(make_plan(StaticSchedule(len(requests), 1, 1)), "tiny", requests=requests)
    rra = run_plan(make_plan(RRASchedule(len(requests), 50, 1, 0, 1), decode_batch=len(requests)), "tiny",
                   requests=requests)
    longest = max(r.output_len for r in requests)
    assert static.decode_batch == len(requests)  # every iteration computes the whole batch
    assert rra.decode_batch < len(requests)
    total_rows = sum(r.output_len - 1 for r in requests)
    assert rra.decode_batch == pytest.approx(total_rows / (longest - 1))


def test_latency_is_measured_at_latency_len(requests):
    rep = run_plan(make_plan(RRASchedule(4, 3, 1, 0, 1), latency_len=6), "tiny", requests=requests)
    lat = [r.latency_len_token_s - r.encode_start_s for r in rep.requests if r.output_len >= 6]
    assert lat and rep.latency_s == pytest.approx(max(lat))
    assert all(r.latency_len_token_s is None for r in rep.requests if r.output_len < 6)
    assert rep.latency_p50_s <= rep.latency_s


def test_over_long_requests_are_rejected_others_complete(model):
    # cache_len is 36 (the workload's 20 + 16); the model's context is 512.
    pairs = [(10, 5), (30, 10), (8, 3), (500, 20), (12, 24), (6, 1)]
    reqs = requests_from_pairs(pairs, vocab_size=256, seed=5)
    rep = run_plan(make_plan(RRASchedule(2, 2, 1, 0, 1)), "tiny", requests=reqs, keep_tokens=True)
    by_id = {r.id: r for r in rep.requests}
    assert by_id[1].status == FAILED and "KV-cache budget of 36" in by_id[1].reason
    assert by_id[3].status == FAILED and "context of 512" in by_id[3].reason
    for i in (0, 2, 4, 5):
        r = reqs[i]
        assert by_id[i].status == FINISHED
        assert list(by_id[i].tokens) == greedy_reference(model, list(r.prompt), r.output_len)
    assert_complete(rep, reqs)


def test_stop_at_eos(model, requests, reference):
    # Pick as EOS a token that some reference output produces before its end.
    eos = next(t for toks in reference.values() for t in toks[:-1])
    rep = run_plan(make_plan(RRASchedule(3, 2, 1, 0, 1)), "tiny", requests=requests, keep_tokens=True,
                   stop_at_eos=True, eos_id=eos)
    assert_complete(rep, requests)
    stopped = 0
    for rec in rep.requests:
        r = requests[rec.id]
        want = greedy_reference(model, list(r.prompt), r.output_len, eos_id=eos)
        assert list(rec.tokens) == want
        stopped += len(want) < r.output_len
    assert stopped >= 1


@pytest.mark.parametrize("seqs,kv_tokens", [(4, math.inf), (6, 120.0)])
def test_continuous_batching_tokens_match_reference(requests, reference, seqs, kv_tokens):
    """Every step admits what fits; with a pool of 15 blocks of 8 tokens the newest request is preempted and
    recomputed from its prompt and tokens, and its greedy tokens still equal single-request decoding."""
    plan = make_plan(CBSchedule(seqs, 64, 1, 0, 1, block_size=8))
    plan = dataclasses.replace(plan, estimate=dataclasses.replace(plan.estimate, kv_tokens=kv_tokens))
    rep = run_plan(plan, "tiny", requests=requests, keep_tokens=True, log_decisions=True)
    assert_complete(rep, requests, reference)
    assert rep.num_finished == len(requests) and 0 < rep.decode_batch <= seqs
    evictions = sum("Evict" in d for d in rep.decisions)
    assert (evictions > 0) == math.isfinite(kv_tokens)


@pytest.mark.parametrize("budget,seqs,kv_tokens", [(9, 4, math.inf), (12, 6, 64.0)])
def test_chunked_prefill_tokens_match_reference(requests, reference, budget, seqs, kv_tokens):
    """Prompts of up to 20 tokens in steps of 9 or 12 tokens shared with the decodes span several chunks, each
    attending its row's cached prefix; with a pool of 8 blocks requests are preempted and recomputed too."""
    plan = make_plan(ChunkedSchedule(budget, seqs, 1, 0, 1, block_size=8))
    plan = dataclasses.replace(plan, estimate=dataclasses.replace(plan.estimate, kv_tokens=kv_tokens))
    rep = run_plan(plan, "tiny", requests=requests, keep_tokens=True, log_decisions=True)
    assert_complete(rep, requests, reference)
    assert rep.num_finished == len(requests)
    chunks = "".join(d for d in rep.decisions if "Chunk(" in d)
    assert re.search(r"\(\d+, [1-9]\d*, \d+\)", chunks)  # (request, start > 0, length): a prompt's later chunk
    assert (sum("Evict" in d for d in rep.decisions) > 0) == math.isfinite(kv_tokens)


def test_policy_registry():
    assert policy_module(Policy.RRA) is policy_module("rra")
    assert policy_module("waa_c") is policy_module(Policy.WAA_M)
    with pytest.raises(ExeGPTError, match="unknown policy: 'fifo'; registered: rra, waa_c, waa_m, static, cb, "
                                          "chunked, disagg"):
        policy_module("fifo")


def test_remap_stages_proportional():
    stages = (Stage("both", 1, 0, 10), Stage("both", 1, 10, 30))
    out = remap_stages(stages, 4)
    assert [(s.first_layer, s.n_layers) for s in out] == [(0, 1), (1, 3)]
    waa = (Stage("encode", 1, 0, 40), Stage("decode", 1, 0, 20), Stage("decode", 1, 20, 20))
    out = remap_stages(waa, 2)
    assert [(s.role, s.first_layer, s.n_layers) for s in out] == [("encode", 0, 2), ("decode", 0, 1),
                                                                  ("decode", 1, 1)]
    with pytest.raises(ValueError, match="fewer than the 3"):
        remap_stages((Stage("both", 1, 0, 1),) * 3, 2)


def test_plan_stages_must_match_schedule():
    with pytest.raises(ValueError, match="do not match"):
        check_stages(make_plan(RRASchedule(2, 2, 1, 0, 2), stages=ONE))


def test_plan_for_other_model_is_remapped(requests, reference):
    """A plan made for a 40-layer model runs on tiny (2 layers) with its split scaled."""
    plan = make_plan(RRASchedule(4, 3, 1, 0, 1), stages=(Stage("both", 1, 0, 40),))
    rep = run_plan(plan, "tiny", requests=requests, keep_tokens=True)
    assert_complete(rep, requests, reference)


# --- two processes (gloo) ------------------------------------------------------------------------

TWO_RANK_PLANS = {
    "rra-pp2": (RRASchedule(4, 3, 1, 0, 2), PP2),
    "rra-tp2": (RRASchedule(3, 2, 2, 2, 2), (Stage("both", 2, 0, 2),)),
    "static-pp2": (StaticSchedule(5, 1, 2), PP2),
    "waa-1+1": (WAASchedule(Policy.WAA_C, 3, 2, 1, 0, 1, 1), (Stage("encode", 1, 0, 2), Stage("decode", 1, 0, 2))),
    # 1 + 4 decode rows: every second encoded batch must wait for free rows (backpressure); B_m = 1.
    "waa-tight": (WAASchedule(Policy.WAA_M, 4, 1, 1, 0, 1, 1), (Stage("encode", 1, 0, 2), Stage("decode", 1, 0, 2)),
                  1.0),
    "disagg-1+1": (DisaggSchedule(6, 40, 1, 1, block_size=4), (Stage("encode", 1, 0, 2), Stage("decode", 1, 0, 2))),
    # A decode pool of 16 blocks of 4 tokens: merges wait for blocks, requests are preempted and recomputed there.
    "disagg-tight": (DisaggSchedule(6, 40, 1, 1, block_size=4), (Stage("encode", 1, 0, 2), Stage("decode", 1, 0, 2))),
}


@pytest.mark.slow
def test_two_ranks_tokens_match_reference(requests, reference):
    """RRA pipelined over 2 stages, RRA with TP 2, static over 2 stages, WAA 1+1 (roomy and tight): one set of
    2 processes."""
    names = list(TWO_RANK_PLANS)
    plans = [make_plan(*TWO_RANK_PLANS[n][:2], decode_batch=(TWO_RANK_PLANS[n][2:] or (6.0,))[0]) for n in names]
    tight = names.index("disagg-tight")
    tight_estimate = dataclasses.replace(plans[tight].estimate, kv_tokens=64.0)
    plans[tight] = dataclasses.replace(plans[tight], estimate=tight_estimate)
    reports = run_plans(plans, "tiny", requests=requests, keep_tokens=True, timeout_s=180, log_decisions=True)
    for name, rep in zip(names, reports):
        assert rep is not None, name
        assert rep.num_ranks == 2 and rep.policy == plans[names.index(name)].schedule.policy.value
        assert_complete(rep, requests, reference)
        assert rep.num_finished == len(requests), name
        if name == "waa-tight":
            assert rep.decode_batch <= 5  # never more rows than the cache holds
        if name == "disagg-tight":
            assert sum("Evict" in d for d in rep.decisions) >= 2 and any("resume=True" in d for d in rep.decisions)


@pytest.mark.slow
def test_rank_failure_stops_run_naming_rank(requests):
    t = time.monotonic()
    with pytest.raises(RankFailedError, match="rank 1") as e:
        run_plan(make_plan(RRASchedule(4, 3, 1, 0, 2), PP2), "tiny", requests=requests, fault=Fault(1, 3),
                 timeout_s=60)
    assert e.value.rank == 1
    assert "injected fault" in str(e.value)
    assert time.monotonic() - t < 60


def test_ranks_that_die_at_startup_are_named_even_with_large_arguments():
    """A launch from a script on stdin: the spawned ranks cannot re-import ``__main__`` and die before they start.
    With a run's worth of arguments (~1 MB) the launcher must still name the dead ranks, not wait for them to read
    their startup payload (it hung when the arguments travelled in the spawn pipe)."""
    import subprocess
    import sys

    script = ("from runner.launch import launch, RankFailedError\n"
              "try:\n"
              "    launch(print, 2, (list(range(200_000)),), timeout_s=60)\n"
              "except RankFailedError as e:\n"
              "    print('FAILED', e)\n")
    done = subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True, timeout=90)
    assert "FAILED rank" in done.stdout and "died" in done.stdout, done.stdout + done.stderr[-2000:]


def test_plans_run_in_one_process_share_one_build_of_the_model(requests, reference):
    """The second plan reuses the first's weights (one build per process) with a new, empty KV cache: its tokens
    are the reference's all the same; another precision builds anew."""
    from runner import pipeline

    run_plan(make_plan(RRASchedule(4, 3, 1, 0, 1), decode_batch=6.0), "tiny", requests=requests)
    [(model, _)] = pipeline._LAST_BUILT.values()
    cache = model.cache
    rep = run_plan(make_plan(RRASchedule(3, 7, 1, 0, 1), decode_batch=9.0), "tiny", requests=requests,
                   keep_tokens=True)
    assert_complete(rep, requests, reference)
    [(again, _)] = pipeline._LAST_BUILT.values()
    assert again is model and again.cache is not cache
    run_plan(make_plan(RRASchedule(4, 3, 1, 0, 1), decode_batch=6.0), "tiny", requests=requests, dtype="bf16")
    [(other, _)] = pipeline._LAST_BUILT.values()
    assert other is not model and other.tok_embeddings.weight.dtype == torch.bfloat16


@pytest.mark.slow
def test_split_policies_with_a_two_rank_group_under_arrivals(requests, reference):
    """WAA and disaggregation, each 1+2 with the decode group pipelined and 2+1 with the encode group in TP, one
    after the other in the same three processes, requests arriving over time: the encoder forms its batches from
    what has arrived, the END fillers of every encode rank match the receives the decode ranks keep posted (each
    later plan runs on clean channels), and the tokens are the reference's."""
    plans = [make_plan(WAASchedule(Policy.WAA_C, 3, 4, 1, 0, 1, 2),
                       (Stage("encode", 1, 0, 2), Stage("decode", 1, 0, 1), Stage("decode", 1, 1, 1))),
             make_plan(WAASchedule(Policy.WAA_C, 3, 4, 2, 2, 2, 1),
                       (Stage("encode", 2, 0, 2), Stage("decode", 1, 0, 2))),
             make_plan(DisaggSchedule(8, 30, 1, 2, 1, 1),
                       (Stage("encode", 1, 0, 2), Stage("decode", 1, 0, 1), Stage("decode", 1, 1, 1))),
             make_plan(DisaggSchedule(8, 30, 2, 1, 2, 1), (Stage("encode", 2, 0, 2), Stage("decode", 1, 0, 2)))]
    arrivals = tuple(dataclasses.replace(r, arrival_s=0.01 * r.id) for r in requests)
    reports = run_plans(plans, "tiny", requests=arrivals, keep_tokens=True, timeout_s=180)
    for rep in reports:
        assert rep is not None and rep.num_ranks == 3
        assert_complete(rep, arrivals, reference)
        assert rep.num_finished == len(requests)
        assert all(r.encode_start_s >= r.arrival_s for r in rep.requests)


def test_every_one_rank_policy_on_smollm2_gives_greedy_tokens(smollm2):
    """The pretrained SmolLM2-135M under RRA, static batching, continuous batching and chunked prefill: every
    request's tokens equal single-request greedy decoding, in fp32 (RRA, CB), and in bf16 with batch-invariant
    numerics (``runner.numerics``; without them a batched bf16 GEMM rounds differently from one row's now and
    then, and random prompts give near-tied logits)."""
    model, args, _ = smollm2
    w = SMOLLM2_W
    reqs = make_requests(w, 7, args.vocab_size, seed=3)
    ref = {r.id: greedy_reference(model, list(r.prompt), r.output_len) for r in reqs}
    stages = (Stage("both", 1, 0, args.n_layers),)
    plans = [dataclasses.replace(make_plan(s, stages), workload=w)
             for s in (RRASchedule(3, 3, 1, 0, 1), StaticSchedule(4, 1, 1), CBSchedule(4, 64, 1, 0, 1),
                       ChunkedSchedule(10, 4, 1, 0, 1))]
    for rep in run_plans(plans[::2], "smollm2", requests=reqs, keep_tokens=True):  # RRA, CB (tiny covers the rest)
        assert_complete(rep, reqs, ref)
    for rep in run_plans(plans, "smollm2", requests=reqs, keep_tokens=True, dtype="bf16", batch_invariant=True):
        assert_complete(rep, reqs, smollm2_bf16_reference(reqs))


SMOLLM2_W = Workload.truncated_normal((14, 5, 24), (8, 3, 12))
_BF16_REFERENCES: dict = {}


def smollm2_bf16_reference(reqs) -> dict:
    """Single-request greedy tokens of SmolLM2-135M in bf16 under batch-invariant numerics (computed once per
    request set)."""
    key = tuple((r.id, r.prompt, r.output_len) for r in reqs)
    if key not in _BF16_REFERENCES:
        model, _, _ = load_model("smollm2", dtype=torch.bfloat16)
        with numerics.batch_invariant():
            _BF16_REFERENCES[key] = {r.id: greedy_reference(model, list(r.prompt), r.output_len) for r in reqs}
    return _BF16_REFERENCES[key]


@pytest.mark.slow
def test_split_policies_on_smollm2_give_greedy_tokens(smollm2):
    """SmolLM2-135M in bf16 on two ranks under WAA and prefill/decode disaggregation, batch-invariant numerics:
    the KV of every prefilled batch moves between the ranks and every request's tokens equal single-request
    greedy decoding."""
    _, args, _ = smollm2
    w = SMOLLM2_W
    reqs = make_requests(w, 7, args.vocab_size, seed=3)  # the one-rank test's: its reference is computed once
    ref = smollm2_bf16_reference(reqs)
    split = (Stage("encode", 1, 0, args.n_layers), Stage("decode", 1, 0, args.n_layers))
    plans = [dataclasses.replace(make_plan(s, split), workload=w)
             for s in (WAASchedule(Policy.WAA_C, 3, 4, 1, 0, 1, 1), DisaggSchedule(6, 64, 1, 1))]
    for rep in run_plans(plans, "smollm2", requests=reqs, keep_tokens=True, timeout_s=180, dtype="bf16",
                         batch_invariant=True):
        assert_complete(rep, reqs, ref)
        assert rep.num_finished == len(reqs)
