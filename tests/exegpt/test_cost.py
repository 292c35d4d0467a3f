"""The cost model's terms, checked against the profile lookups they are made of."""

import math

import numpy as np
import pytest

from exegpt import Kernel, Profile, Workload
from exegpt.cost import CostModel, WorkloadStats
from exegpt.models import MODELS

from .conftest import make_profile, tiny_cpu_profile


def test_first_tp_stage_pays_the_drivers_command_hop():
    """A pipeline's first stage with TP > 1 waits for the driver's command (its int64 meta: 3 per row plus the
    token ids) before its other ranks can start; a TP-1 stage and later stages do not."""
    prof = make_profile()
    stats = WorkloadStats.of(Workload.task("S"))
    cost = CostModel(prof, MODELS["opt-13b"], stats)
    rows = np.array([4.0, 32.0])
    hop, _ = prof.lookup(Kernel.SEND_RECV, 1, 8.0 * (3 * rows + rows))
    for tp in (1, 2):
        plain, _ = cost.stage_decode(tp, 10, True, rows)
        first, _ = cost.stage_decode(tp, 10, True, rows, first=True)
        np.testing.assert_allclose(first - plain, hop if tp > 1 else 0.0)
    b = np.array([2.0, 8.0])
    tokens = b * stats.in_mean
    hop, _ = prof.lookup(Kernel.SEND_RECV, 1, 8.0 * (3 * b + tokens))
    plain, _ = cost.stage_encode(2, 10, 0, False, b)
    first, _ = cost.stage_encode(2, 10, 0, False, b, first=True)
    np.testing.assert_allclose(first - plain, hop)


def test_engine_work_is_on_the_drivers_stage():
    """The executor's own work (engine_*: commands, token bookkeeping, row moves) runs on the driver, which leads
    a pipeline's first stage: a first stage pays it, a last stage that is not also the first does not."""
    prof = tiny_cpu_profile()
    assert prof.has(Kernel.ENGINE_DECODE) and prof.has(Kernel.ENGINE_ENCODE)
    stats = WorkloadStats.of(Workload.truncated_normal(input=(64, 20, 128), output=(32, 10, 64)))
    cost = CostModel(prof, MODELS["tiny"], stats)
    rows, b = np.array([4.0, 32.0]), np.array([2.0, 8.0])
    eng_d, _ = prof.lookup(Kernel.ENGINE_DECODE, 1, rows, stats.max_ctx(rows))
    eng_e, _ = prof.lookup(Kernel.ENGINE_ENCODE, 1, b, stats.max_input(b))
    assert (eng_d > 0).all() and (eng_e > 0).all()
    for last in (False, True):
        plain, _ = cost.stage_decode(1, 1, last, rows)
        first, _ = cost.stage_decode(1, 1, last, rows, first=True)
        np.testing.assert_allclose(first - plain, eng_d)
        plain, _ = cost.stage_encode(1, 1, 0, last, b)
        first, _ = cost.stage_encode(1, 1, 0, last, b, first=True)
        np.testing.assert_allclose(first - plain, eng_e)


def test_padded_prefill_is_the_expectation_over_the_longest_prompt():
    """Padded to the batch's longest prompt, a prefill layer costs E[t(B, S_max)] with P(S_max = s) =
    F(s)^B - F(s-)^B: more than t at E[S_max] when t is convex in the length."""
    prof = make_profile(padded=True)
    w = Workload.truncated_normal(input=(64, 40, 256), output=(32, 8, 64), name="w")
    stats = WorkloadStats.of(w)
    cost = CostModel(prof, MODELS["opt-13b"], stats)
    for b in (1.0, 3.0, 16.0):
        p = stats.max_input_pmf(b)
        assert p.sum() == pytest.approx(1.0)
        # over the compressed support (bin means), so within ~1 % of the exact E[longest]
        assert float(p @ stats.in_lengths) == pytest.approx(float(stats.max_input(b)), rel=0.02)
        s = stats.in_lengths
        attn, _ = prof.lookup(Kernel.ATTN_ENCODE, 1, np.full_like(s, b), s)
        dense, _ = prof.lookup(Kernel.DENSE_ENCODE, 1, b * s)
        want = float((attn + dense) @ p)
        got, ok = cost.encode_layer(1, b)
        assert bool(ok) and float(got) == pytest.approx(want)
        at_mean = sum(float(prof.lookup(k, 1, *xy)[0]) for k, xy in (
            (Kernel.ATTN_ENCODE, (b, stats.max_input(b))), (Kernel.DENSE_ENCODE, (b * stats.max_input(b),))))
        assert float(got) > at_mean or math.isclose(float(got), at_mean, rel_tol=1e-9)


@pytest.mark.parametrize("padded_decode", [False, True])
def test_decode_attention_is_looked_up_at_the_mean_context_unless_every_row_attends_the_longest(padded_decode):
    """A backend whose rows attend their own prefix (the CPU decode kernels, paged attention) costs a decode step
    at the batch's mean context; one that attends every row over the longest (torch's masked path) at the
    expected longest. Prefill padding is a separate switch."""
    prof = make_profile(padded=True, padded_decode=padded_decode)
    stats = WorkloadStats.of(Workload.truncated_normal(input=(64, 40, 256), output=(128, 60, 400), name="w"))
    cost = CostModel(prof, MODELS["opt-13b"], stats)
    rows = np.array([1.0, 8.0, 64.0])
    ctx = stats.max_ctx(rows) if padded_decode else np.full(rows.shape, stats.decode_ctx)
    assert (stats.max_ctx(rows[1:]) > stats.decode_ctx * 1.5).all()  # the two readings differ here
    attn, _ = prof.lookup(Kernel.ATTN_DECODE, 1, rows, ctx)
    dense, _ = prof.lookup(Kernel.DENSE_DECODE, 1, rows)
    got, ok = cost.decode_layer(1, rows)
    assert ok.all()
    np.testing.assert_allclose(got, attn + dense)
    assert Profile.from_json(prof.to_json()).padded_decode is padded_decode
    old = {k: v for k, v in prof.to_dict().items() if k != "padded_decode"}  # a file from before the field
    assert Profile.from_dict(old).padded_decode is True  # read as padded_batches


def test_tp_command_carries_the_packed_prompt_tokens_when_the_backend_pads():
    """The runner pads a prefill batch on the ranks, but its command carries each prompt's own token ids."""
    prof = make_profile(padded=True)
    stats = WorkloadStats.of(Workload.truncated_normal(input=(64, 40, 256), output=(32, 8, 64), name="w"))
    cost = CostModel(prof, MODELS["opt-13b"], stats)
    b = np.array([2.0, 8.0])
    hop, _ = prof.lookup(Kernel.SEND_RECV, 1, 8.0 * (3 * b + b * stats.in_mean))
    plain, _ = cost.stage_encode(2, 10, 0, False, b)
    first, _ = cost.stage_encode(2, 10, 0, False, b, first=True)
    np.testing.assert_allclose(first - plain, hop)


def test_rank_slowdown_scales_what_a_rank_computes_not_its_messages():
    """CostModel.slowdown multiplies layers, head, step overhead and engine work; the hop and the all-reduces stay
    as profiled (measured under load)."""
    prof = make_profile()
    stats = WorkloadStats.of(Workload.task("S"))
    rows = np.array([4.0, 32.0])
    plain = CostModel(prof, MODELS["opt-13b"], stats)
    slow = CostModel(prof, MODELS["opt-13b"], stats, slowdown=1.5)
    hop, _ = plain._send(rows)
    assert (hop > 0).all()
    t1, _ = plain.stage_decode(1, 10, False, rows)  # layers + step overhead + the hop onward
    t2, _ = slow.stage_decode(1, 10, False, rows)
    np.testing.assert_allclose(t2, 1.5 * (t1 - hop) + hop)
    h1, _ = plain.stage_decode(1, 10, True, rows)  # with the LM head, no hop
    h2, _ = slow.stage_decode(1, 10, True, rows)
    np.testing.assert_allclose(h2, 1.5 * h1)
    ar, _ = plain._ar(2, rows)
    a1, _ = plain.stage_decode(2, 10, True, rows)
    a2, _ = slow.stage_decode(2, 10, True, rows)
    np.testing.assert_allclose(a2, 1.5 * (a1 - 20 * ar) + 20 * ar)  # 2 all-reduces a layer


def _estimate(profile, schedule, devices):
    """The estimate of ``schedule`` on ``devices`` for a small CPU-sized workload (the rank-factor tests)."""
    from exegpt import evaluate_schedule

    w = Workload.truncated_normal(input=(64, 20, 128), output=(32, 10, 64))
    return evaluate_schedule(schedule, w, math.inf, profile=profile, devices=devices).estimate


def test_rank_slowdown_round_trips_and_applies_to_groups_of_several_ranks():
    """Profile.rank_slowdown: JSON round trip, the entry of the most ranks up to the asked count, bad entries
    refused; the simulator applies it to a group of stages spanning several ranks (an RRA pipeline) and not to a
    one-rank WAA group or a one-device plan."""
    import dataclasses

    from exegpt import Policy, RRASchedule, WAASchedule
    from exegpt.errors import ExeGPTError

    base = tiny_cpu_profile()
    prof = dataclasses.replace(base, rank_slowdown=((2, 2.0),))
    assert Profile.from_json(prof.to_json()).rank_slowdown == ((2, 2.0),)
    assert (prof.slowdown(1), prof.slowdown(2), prof.slowdown(4)) == (1.0, 2.0, 2.0)
    assert base.slowdown(2) == 1.0
    with pytest.raises(ExeGPTError, match="rank_slowdown entry"):
        dataclasses.replace(base, rank_slowdown=((1, 2.0),))
    with pytest.raises(ExeGPTError, match="rank_slowdown"):
        Profile.from_dict(prof.to_dict() | {"rank_slowdown": {"two": 2.0}})

    pp2 = RRASchedule(8, 4, 1, 0, 2)
    assert _estimate(prof, pp2, "2xcpu").decode_step_s > 1.5 * _estimate(base, pp2, "2xcpu").decode_step_s
    waa = WAASchedule(Policy.WAA_C, 2, 16, 1, 0, 1, 1)
    assert _estimate(prof, waa, "2xcpu") == _estimate(base, waa, "2xcpu")
    one = RRASchedule(4, 4, 1, 0, 1)
    assert _estimate(prof, one, "1xcpu") == _estimate(base, one, "1xcpu")


def test_rank_concurrency_slows_the_one_rank_groups_of_a_waa_plan_while_both_compute():
    """Profile.rank_concurrency: JSON round trip and refusal as rank_slowdown; a 1+1 WAA plan's encode interval and
    decode iteration both take (c - 1) * min(encode, decode) longer, and its period is the longer of them; RRA
    plans (one device, or a pipeline, which has the rank slowdown) are unchanged."""
    import dataclasses

    from exegpt import Policy, RRASchedule, WAASchedule
    from exegpt.errors import ExeGPTError

    base = tiny_cpu_profile()
    prof = dataclasses.replace(base, rank_concurrency=((2, 1.5),))
    assert Profile.from_json(prof.to_json()).rank_concurrency == ((2, 1.5),)
    assert (prof.concurrency(1), prof.concurrency(2), base.concurrency(2)) == (1.0, 1.5, 1.0)
    with pytest.raises(ExeGPTError, match="rank_concurrency entry"):
        dataclasses.replace(base, rank_concurrency=((2, 0.0),))
    with pytest.raises(ExeGPTError, match="rank_concurrency"):
        Profile.from_dict(prof.to_dict() | {"rank_concurrency": [1.5]})

    waa = WAASchedule(Policy.WAA_C, 2, 16, 1, 0, 1, 1)
    alone, both = _estimate(base, waa, "2xcpu"), _estimate(prof, waa, "2xcpu")
    extra = 0.5 * min(alone.encode_stage_s, alone.decode_step_s)
    assert both.encode_stage_s == pytest.approx(alone.encode_stage_s + extra, rel=1e-12)
    assert both.decode_step_s == pytest.approx(alone.decode_step_s + extra, rel=1e-12)
    assert both.decode_batch == alone.decode_batch
    assert both.throughput_seq_s < alone.throughput_seq_s and both.latency_s > alone.latency_s
    for schedule, devices in ((RRASchedule(8, 4, 1, 0, 2), "2xcpu"), (RRASchedule(4, 4, 1, 0, 1), "1xcpu")):
        assert _estimate(prof, schedule, devices) == _estimate(base, schedule, devices)


def test_the_waa_period_factor_stretches_a_waa_plans_period_and_nothing_else():
    """Profile.waa_period_factor: JSON round trip (absent: 1), one-line refusal below 1; a WAA plan's period, so its
    throughput, divides by it exactly and its latency grows by its k + 1 periods and its first iteration; RRA plans
    are unchanged."""
    import dataclasses

    from exegpt import Policy, RRASchedule, WAASchedule
    from exegpt.errors import ExeGPTError

    base = tiny_cpu_profile()
    prof = dataclasses.replace(base, waa_period_factor=1.25)
    assert Profile.from_json(prof.to_json()).waa_period_factor == 1.25
    d = base.to_dict()
    d.pop("waa_period_factor")
    assert Profile.from_dict(d).waa_period_factor == 1.0  # profiles written before the field
    for bad in (0.9, float("nan"), "1.2"):
        with pytest.raises(ExeGPTError, match="waa_period_factor=.* must be a number >= 1"):
            dataclasses.replace(base, waa_period_factor=bad)

    waa = WAASchedule(Policy.WAA_C, 2, 16, 1, 0, 1, 1)
    plain, coupled = _estimate(base, waa, "2xcpu"), _estimate(prof, waa, "2xcpu")
    assert coupled.throughput_seq_s == pytest.approx(plain.throughput_seq_s / 1.25, rel=1e-12)
    assert (coupled.encode_stage_s, coupled.decode_step_s) == (plain.encode_stage_s, plain.decode_step_s)
    period = waa.encode_batch / plain.throughput_seq_s
    k = coupled.latency_len - 1  # decode iterations of the bound-length output (its first token is the prefill's)
    # The decoder is this plan's bottleneck: a batch waits HANDOFF_DEPTH = 2 periods from its encode start to its
    # merge, then decodes one iteration and k - 1 periods more, every one of them stretched.
    assert coupled.latency_s - plain.latency_s == pytest.approx(0.25 * ((k + 1) * period + plain.decode_step_s),
                                                                rel=1e-9)
    for schedule, devices in ((RRASchedule(8, 4, 1, 0, 2), "2xcpu"), (RRASchedule(4, 4, 1, 0, 1), "1xcpu")):
        assert _estimate(prof, schedule, devices) == _estimate(base, schedule, devices)
