"""find_schedule's public behaviour: defaults, JSON round trip, frontier, memory, baselines, errors."""

import itertools
import json
import math

import numpy as np
import pytest

from exegpt import (ExeGPTError, InfeasibleBoundError, LatencyBound, Plan, Policy, Profile, RRASchedule, SearchSpace,
                    StaticSchedule, WAASchedule, Workload, evaluate_schedule, find_schedule,
                    simulate, static_schedule)
from exegpt.monotonicity import monotonicity_stats
from exegpt.problem import problem
from exegpt.search.optimize import build_spaces
from exegpt.placement import bottleneck_s, place_layers
from exegpt.sim import run_simulated

from .conftest import make_profile, tiny_cpu_profile


def test_two_argument_call_uses_the_paper_default_and_round_trips():
    w = Workload.truncated_normal(input=(256, 252, 512), output=(32, 13, 80))
    plan = find_schedule(w, 5.9)
    assert plan.model == "opt-13b" and plan.devices == "4xA40"
    assert plan.estimate.latency_s <= 5.9 and plan.estimate.throughput_seq_s > 0
    assert plan.search.wall_s > 0 and plan.search.candidates_evaluated > 0
    assert Plan.from_json(plan.to_json()) == plan
    assert sum(s.n_layers for s in plan.stages if s.role in ("both", "decode")) == 40


def test_plan_file_round_trip(tmp_path):
    plan = find_schedule(Workload.task("C1"), math.inf, model="llama-2-7b", devices="2xA100")
    back = Plan.load(plan.save(tmp_path / "plan.json"))
    assert back == plan and back.bound.bound_s == math.inf


def test_a_trace_plan_keeps_its_joint_sample(tmp_path):
    """A plan saved for a trace keeps the trace's (input, output) pairs and timestamps, so the requests drawn from
    the plan alone keep the trace's pairing (not lengths drawn independently)."""
    from exegpt import request_stream

    w = Workload.from_pairs([(20 + 7 * i % 90, 5 + (13 * i) % 40) for i in range(300)],
                            arrivals_s=[0.1 * i for i in range(300)], name="t")
    plan = find_schedule(w, math.inf, model="llama-2-7b", devices="1xA100", policies=["rra"])
    back = Plan.load(plan.save(tmp_path / "plan.json"))
    assert back.workload.pairs == w.pairs and back.workload.arrivals_s == w.arrivals_s
    drawn = request_stream(back.workload, 200, seed=1).lengths
    assert {tuple(p) for p in drawn.tolist()} <= set(w.pairs)


@pytest.mark.parametrize("task", ["S", "T", "C1"])
def test_throughput_never_decreases_as_the_bound_loosens(task):
    w = Workload.task(task)
    p = make_profile(noise=0.1, seed=7)
    kw = dict(profile=p, devices="4xA40", space=SearchSpace(64, 64), policies=("rra", "waa_c", "waa_m"))
    inf_plan = find_schedule(w, math.inf, **kw)
    bounds = np.geomspace(inf_plan.estimate.latency_s / 20, inf_plan.estimate.latency_s * 1.5, 12)
    last = 0.0
    for b in bounds:
        try:
            thr = find_schedule(w, float(b), **kw).estimate.throughput_seq_s
        except InfeasibleBoundError:
            assert last == 0.0  # once feasible, a looser bound stays feasible
            continue
        assert thr >= last * (1 - 1e-12)
        last = thr
    assert last == pytest.approx(inf_plan.estimate.throughput_seq_s)


def test_memory_limit_is_never_violated():
    # A model that barely fits: every returned plan and every point the search calls feasible must fit.
    w = Workload.task("C2")
    for devices in ("2xA40", "4xA40"):
        for b in (20.0, 60.0, math.inf):
            try:
                plan = find_schedule(w, b, model="opt-13b", devices=devices)
            except InfeasibleBoundError:
                continue
            assert plan.estimate.memory_ok
            assert max(plan.estimate.memory_bytes) <= plan.estimate.memory_capacity_bytes


def test_feasible_points_fit_and_infeasible_neighbours_do_not():
    w = Workload.task("C2")
    prob = problem(w, math.inf, model="opt-13b", devices="2xA40")
    from exegpt.simulate import estimate
    from exegpt.search.bnb import grid_values
    for lay, space in build_spaces(prob, space=SearchSpace(64, 64)):
        axes, thr, lat, ok = grid_values(space)
        rng = np.random.default_rng(0)
        for _ in range(20):
            i, j = rng.integers(0, len(axes[0])), rng.integers(0, len(axes[1]))
            pt = (int(axes[0][i]), int(axes[1][j]))
            if lay.policy.value == "rra":
                s = RRASchedule(pt[0], pt[1], lay.tp, lay.tp_gpus, 2)
            else:
                s = WAASchedule(lay.policy, pt[0], pt[1], lay.tp, lay.tp_gpus, lay.encode_gpus, lay.decode_gpus)
            e = estimate(prob, lay, s)
            if ok[i, j]:
                assert e.memory_ok
            assert e.throughput_seq_s == pytest.approx(thr[i, j]) and e.latency_s == pytest.approx(lat[i, j])


def test_exegpt_beats_static_batching_at_the_same_bound():
    w = Workload.task("S")
    fastest_static = static_schedule(w, math.inf).estimate.latency_s
    for b in (fastest_static, 2 * fastest_static):
        base = static_schedule(w, b)
        ours = find_schedule(w, b)
        assert isinstance(base.schedule, StaticSchedule)
        assert ours.estimate.throughput_seq_s >= base.estimate.throughput_seq_s


def test_simulate_matches_the_search_estimate():
    w = Workload.task("S")
    plan = find_schedule(w, 11.5)
    est = simulate(plan.schedule, w, bound=11.5)
    assert est == plan.estimate
    assert evaluate_schedule(plan.schedule, w, 11.5).estimate == plan.estimate


def test_rra_closed_form_latency():
    w = Workload.task("S")
    s = RRASchedule(encode_batch=16, decode_iters=8, tp=1, tp_gpus=0, num_gpus=1)
    e = simulate(s, w, model="llama-2-7b", devices="1xA100")
    k = 63 - 1
    # The bound-length query's k iterations each run beside R_L rows (exegpt.phases.QueryRows), more than the
    # mean decode batch: they are the first iterations of their phases.
    from exegpt.policies.rra import box as rra_box
    from exegpt.simulate import layout_for
    prob = problem(w, math.inf, model="llama-2-7b", devices="1xA100")
    d = rra_box(prob, layout_for(prob, s), 16, 16, 8, 8, detail=True)
    rows_q, t_dec_q = d.extra["rows_q"], d.extra["t_dec_q"]
    assert float(rows_q[0] if np.ndim(rows_q) else rows_q) > e.decode_batch
    assert float(np.ravel(t_dec_q)[0]) > e.decode_step_s
    assert e.latency_s == pytest.approx(math.ceil(k / 8) * e.encode_stage_s + k * float(np.ravel(t_dec_q)[0]))
    assert e.throughput_seq_s == pytest.approx(16 / (e.encode_stage_s + 8 * e.decode_step_s))


def test_rra_decode_batch_follows_the_completion_model():
    # Outputs of exactly 10 tokens: k = 9 decode iterations; with N_D = 4 a query spans 3 phases, so the
    # batch refilled at a phase start holds 3 generations of 6 queries, and an iteration computes 6 * 9 / 4 rows.
    w = Workload.truncated_normal(input=(32, 0, 32), output=(10, 0, 10))
    s = RRASchedule(encode_batch=6, decode_iters=4, tp=1, tp_gpus=0, num_gpus=1)
    e = simulate(s, w, model="llama-2-7b", devices="1xA100")
    assert e.refill_batch == pytest.approx(6 * 3)
    assert e.decode_batch == pytest.approx(6 * 9 / 4)


def test_rra_refill_batch_is_littles_law_on_mixed_lengths():
    # Outputs of 3 or 9 tokens (k = 2 or 8), N_D = 4: phases per query 1 or 2, E = 1.5 -> refill 1.5 B_E.
    from exegpt import Distribution
    w = Workload(Distribution((16,), (1.0,)), Distribution((3, 9), (0.5, 0.5)))
    e = simulate(RRASchedule(8, 4, 1, 0, 1), w, model="llama-2-7b", devices="1xA100")
    assert e.refill_batch == pytest.approx(8 * 1.5)
    assert e.decode_batch == pytest.approx(8 * 5 / 4)


def test_monotonicity_statistics_are_reported():
    prob = problem(Workload.task("S"), math.inf, model="opt-13b", devices="4xA40")
    rows = {r.variable: r for r in monotonicity_stats(prob, build_spaces(prob, space=SearchSpace(32, 32)))}
    assert {"RRA B_E", "RRA N_D", "WAA B_E", "WAA B_m"} <= set(rows)
    for r in rows.values():
        assert r.steps > 0 and 0 <= r.throughput_monotone <= 1 and 0 <= r.latency_monotone <= 1
    assert rows["RRA B_E"].throughput_monotone > 0.95


@pytest.mark.parametrize("seed", range(8))
def test_placement_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    n_layers, n_stages = int(rng.integers(4, 13)), int(rng.integers(2, 5))
    layer_s = list(rng.uniform(0.5, 2.0, n_stages))
    fixed_s = [0.0] * (n_stages - 1) + [float(rng.uniform(0, 2))]
    layer_b = list(rng.uniform(1, 3, n_stages) * 2 ** 20)
    fixed_b = list(rng.uniform(0, 2, n_stages) * 2 ** 20)
    cap = float(rng.uniform(6, 20) * 2 ** 20)
    got = place_layers(n_layers, layer_s, fixed_s, layer_b, fixed_b, cap)
    best = None
    mb = 2 ** 20
    for counts in itertools.product(range(1, n_layers + 1), repeat=n_stages):
        if sum(counts) != n_layers:
            continue
        if any(c * -(-b // mb) + -(-f // mb) > cap // mb for c, b, f in zip(counts, layer_b, fixed_b)):
            continue
        t = bottleneck_s(counts, layer_s, fixed_s)
        best = t if best is None else min(best, t)
    if best is None:
        assert got is None
    else:
        assert sum(got) == n_layers
        assert bottleneck_s(got, layer_s, fixed_s) == pytest.approx(best, rel=1e-3)


# --- bad input ---------------------------------------------------------------------------------

W = Workload.task("S")


@pytest.mark.parametrize("call,match", [
    (lambda: find_schedule(W, 0), "latency bound 0"),
    (lambda: find_schedule(W, -1.0), "latency bound -1"),
    (lambda: find_schedule(W, "fast"), "must be seconds"),
    (lambda: find_schedule(W, 3.1, model="gpt-5"), "unknown model 'gpt-5'"),
    (lambda: find_schedule(W, 3.1, devices="4xB300"), "unknown device 'B300'"),
    (lambda: find_schedule(W, 3.1, devices="four A40"), "devices 'four A40' not understood"),
    (lambda: find_schedule(W, 3.1, devices="2xA40", tp_degrees=[4]), "TP degree 4 exceeds the 2 devices"),
    (lambda: find_schedule(W, 3.1, tp_degrees=[3]), "TP degree 3 must divide"),
    (lambda: find_schedule([1, 2], 3.1), "dist must be a Workload"),
    (lambda: find_schedule(W, 3.1, policies=["fifo"]), "unknown policy: 'fifo'"),
    (lambda: find_schedule(W, 3.1, model="tiny"), "supports 512"),
    (lambda: LatencyBound(3.1, length_quantile=1.5), "length quantile 1.5"),
    (lambda: RRASchedule(0, 1, 1, 0, 4), "encode_batch=0"),
    (lambda: RRASchedule(4, 1, 8, 8, 4), "tp=8 exceeds the 4 devices"),
    (lambda: find_schedule(W, 3.1, device_counts=[5]), "device count 5 must be an integer in \\[1, 4\\]"),
    (lambda: find_schedule(W, 3.1, device_counts=[0, 2]), "device count 0 must be"),
    (lambda: find_schedule(W, 3.1, device_counts=[]), "device_counts is empty"),
])
def test_bad_input_is_a_one_line_error(call, match):
    with pytest.raises(ExeGPTError, match=match) as e:
        call()
    assert "\n" not in str(e.value)


def test_profile_json_errors(tmp_path):
    good = make_profile().to_dict()
    bad_schema = dict(good, schema=99)
    with pytest.raises(ExeGPTError, match="profile schema 99 is not supported; expected 1"):
        Profile.from_dict(bad_schema)
    holey = json.loads(json.dumps(good))
    holey["tables"][0]["seconds"][2] = holey["tables"][0]["seconds"][2][:-1]
    with pytest.raises(ExeGPTError, match="ragged|hole"):
        Profile.from_dict(holey)
    nan = json.loads(json.dumps(good))
    nan["tables"][3]["seconds"][3] = float("nan")
    with pytest.raises(ExeGPTError, match="nan"):
        Profile.from_dict(nan)
    missing = dict(good, tables=[t for t in good["tables"] if t["kernel"] != "lm_head"])
    with pytest.raises(ExeGPTError, match="misses the lm_head table"):
        Profile.from_dict(missing)
    f = tmp_path / "p.json"
    f.write_text("{not json")
    with pytest.raises(ExeGPTError, match="not valid JSON"):
        Profile.load(f)


def test_profile_round_trip_and_range_errors():
    p = make_profile()
    q = Profile.from_json(p.to_json())
    assert q.seconds("attn_decode", 2, 7, 300) == pytest.approx(p.seconds("attn_decode", 2, 7, 300))
    from exegpt import ProfileRangeError
    with pytest.raises(ProfileRangeError, match="batch=5000 is outside the profiled range"):
        p.seconds("attn_decode", 1, 5000, 10)
    assert p.seconds("dense_decode", 1, 1e6) > p.seconds("dense_decode", 1, 65536)  # stated extrapolation


def test_profile_envelopes_are_monotone():
    p = make_profile(noise=0.3, seed=5)
    x = np.linspace(1, 1024, 500)
    for per_unit in (False, True):
        t, _ = p.lookup(p.tables[1].kernel, 1, x, np.full_like(x, 300.0), per_unit=per_unit)
        assert np.all(np.diff(t) >= -1e-15)
    t, _ = p.lookup(p.tables[1].kernel, 1, x, np.full_like(x, 300.0), per_unit=True)
    assert np.all(np.diff(t / x) <= 1e-15)


def test_latency_margin_plans_below_the_bound_and_keeps_it_recorded():
    w = Workload.task("S")
    p = make_profile(noise=0.1, seed=2)
    kw = dict(profile=p, devices="4xA40", space=SearchSpace(64, 64))
    free = find_schedule(w, math.inf, **kw).estimate.latency_s
    plan = find_schedule(w, free, latency_margin=0.25, **kw)
    assert plan.bound.bound_s == free and plan.estimate.latency_s <= 0.75 * free
    assert plan.estimate.throughput_seq_s <= find_schedule(w, free, **kw).estimate.throughput_seq_s
    with pytest.raises(ExeGPTError, match="latency_margin 1.0"):
        find_schedule(w, free, latency_margin=1.0, **kw)


def test_profiled_kv_dtype_counts_the_cache_at_the_backends_precision():
    """A backend that keeps KV wider than the weights (the runner's fp32 cache for half precision on a CPU):
    the plan's memory grows by exactly the KV bytes once more, and the profile round-trips the field."""
    import dataclasses

    from exegpt.memory import kv_bytes
    from exegpt.models import MODELS
    from exegpt.profile import Profile

    from .conftest import make_profile

    w = Workload.task("S")
    prof = make_profile()
    wide = dataclasses.replace(prof, kv_dtype="fp32")
    assert Profile.from_json(wide.to_json()).kv_dtype == "fp32"
    sched = RRASchedule(8, 4, 1, 0, 1)
    base = evaluate_schedule(sched, w, math.inf, profile=prof, devices="1xA40").estimate
    kv32 = evaluate_schedule(sched, w, math.inf, profile=wide, devices="1xA40").estimate
    m = MODELS["opt-13b"]
    assert m.dtype == "fp16"
    rows = math.ceil(base.refill_batch) + sched.encode_batch
    kv16 = kv_bytes(m, 1, m.n_layers, rows, w.input_len.max + w.output_len.max, w.input_len.max)
    assert kv32.memory_bytes[0] - base.memory_bytes[0] == pytest.approx(float(kv16))
    with pytest.raises(ExeGPTError, match="kv_dtype 'int3' unknown"):
        dataclasses.replace(prof, kv_dtype="int3")


def test_profiled_packed_weights_count_once_more_in_weight_memory():
    """A backend that keeps a prepacked copy of every Linear weight (the runner on a CPU): each device's memory grows
    by exactly its Linear weights at the copy's precision (layers and, on the last stage, the LM head); the profile
    round-trips the field and an unknown precision is one clear error."""
    import dataclasses

    from exegpt.models import MODELS
    from exegpt.profile import Profile

    from .conftest import make_profile

    w = Workload.task("S")
    prof = make_profile()
    packed = dataclasses.replace(prof, packed_weight_dtype="fp32")
    assert Profile.from_json(packed.to_json()).packed_weight_dtype == "fp32"
    assert Profile.from_json(prof.to_json()).packed_weight_dtype is None
    sched = RRASchedule(8, 4, 1, 0, 2)  # two stages: embedding on the first, LM head on the last
    base = evaluate_schedule(sched, w, math.inf, profile=prof, devices="2xA40")
    more = evaluate_schedule(sched, w, math.inf, profile=packed, devices="2xA40")
    m = MODELS["opt-13b"]
    assert not m.tied_embeddings and [s.n_layers for s in base.stages] == [s.n_layers for s in more.stages]
    for i, s in enumerate(base.stages):
        extra = s.n_layers * m.layer_params() * 4 + (m.vocab_size * m.dim * 4 if i == len(base.stages) - 1 else 0)
        assert more.estimate.memory_bytes[i] - base.estimate.memory_bytes[i] == pytest.approx(extra)
    # The CPU kernels' panels: a copy counted the same way, beside the prepacked one where both are kept.
    panels = dataclasses.replace(prof, panel_weight_dtype="bf16")
    assert Profile.from_json(panels.to_json()).panel_weight_dtype == "bf16"
    with_panels = evaluate_schedule(sched, w, math.inf, profile=panels, devices="2xA40")
    for i, s in enumerate(base.stages):
        extra = s.n_layers * m.layer_params() * 2 + (m.vocab_size * m.dim * 2 if i == len(base.stages) - 1 else 0)
        assert with_panels.estimate.memory_bytes[i] - base.estimate.memory_bytes[i] == pytest.approx(extra)
    assert dataclasses.replace(m, packed_dtype="fp32", panel_dtype="bf16").weight_bytes_per_param == 2 + 4 + 2
    with pytest.raises(ExeGPTError, match="packed_weight_dtype 'int3' unknown"):
        dataclasses.replace(prof, packed_weight_dtype="int3")
    with pytest.raises(ExeGPTError, match="panel_weight_dtype 'fp4' unknown"):
        dataclasses.replace(prof, panel_weight_dtype="fp4")


def test_waa_hand_off_on_compute_adds_to_the_decode_groups_period():
    """A CPU profile (``handoff_on_compute``): the decode driver receives and imports each batch between its
    decode iterations, so a decode-bound WAA period is T_D + hand-off instead of max(T_D, hand-off)."""
    w = Workload.truncated_normal(input=(32, 8, 64), output=(200, 40, 300))  # long outputs: decode-bound
    s = WAASchedule(Policy.WAA_C, 1, 256, 1, 0, 1, 1)
    off, on = (make_profile("opt-13b", "A100", handoff_on_compute=f) for f in (False, True))
    e_off = evaluate_schedule(s, w, profile=off, devices="2xA100").estimate
    e_on = evaluate_schedule(s, w, profile=on, devices="2xA100").estimate
    assert e_on.decode_step_s == e_off.decode_step_s > e_off.encode_stage_s  # decode-bound, same step
    hand = float(problem(w, math.inf, profile=on, devices="2xA100").cost.kv_handoff(1.0)[0])
    assert hand > 0
    assert 1 / e_off.throughput_seq_s == pytest.approx(e_off.decode_step_s)
    assert 1 / e_on.throughput_seq_s == pytest.approx(e_on.decode_step_s + hand)
    assert Profile.from_json(on.to_json()).handoff_on_compute


def test_a_plan_may_leave_devices_idle_and_is_the_best_over_every_device_count():
    """Two CPU ranks whose computing is twice as slow when they pipeline (rank slowdown 2): on this small model the
    best RRA schedule uses one of them. The default search covers every device count, equals the best of the searches
    restricted to one count each and the exhaustive optimum; ``device_counts=(2,)`` forces both ranks."""
    import dataclasses

    from exegpt import exhaustive_schedule, smallest_feasible_bound

    base = tiny_cpu_profile()
    prof = dataclasses.replace(base, rank_slowdown=((2, 2.0),))
    w = Workload.truncated_normal(input=(64, 20, 128), output=(32, 10, 64))
    kw = dict(profile=prof, devices="2xcpu", space=SearchSpace(32, 64), policies=("rra",))
    bound = 3 * smallest_feasible_bound(w, device_counts=(2,), **kw)
    assert smallest_feasible_bound(w, **kw) < smallest_feasible_bound(w, device_counts=(2,), **kw)
    best = find_schedule(w, bound, **kw)
    per_count = {c: find_schedule(w, bound, device_counts=(c,), **kw) for c in (1, 2)}
    assert (best.schedule.num_gpus, best.devices) == (1, "1xcpu")
    assert per_count[2].schedule.num_gpus == 2 and per_count[2].devices == "2xcpu"
    top = max(p.estimate.throughput_seq_s for p in per_count.values())
    assert best.estimate.throughput_seq_s == top > per_count[2].estimate.throughput_seq_s
    assert exhaustive_schedule(w, bound, **kw).estimate.throughput_seq_s == pytest.approx(top, rel=1e-12)
    # The plan evaluates the same on its own devices, as the runner executes it.
    again = evaluate_schedule(best.schedule, w, bound, profile=prof, devices=best.devices)
    assert again.estimate == best.estimate


VERIFY_W = Workload.truncated_normal(input=(64, 30, 128), output=(24, 10, 60))


def test_verified_pick_keeps_the_bound_on_its_worst_replayed_request():
    """At 1.0 s the search's pick is expected at 1.0 s, but its worst bound-length request, replayed on the
    requests a run draws, takes longer; the verified pick's worst one keeps the bound, at lower throughput."""
    prof = make_profile()
    plain = find_schedule(VERIFY_W, 1.0, profile=prof, devices="1xA40")
    assert plain.estimate.latency_s <= 1.0 < run_simulated(plain, prof, num_requests=200).latency_s
    assert plain.search.replay_requests == 0 and plain.search.replay_latency_s is None
    v = find_schedule(VERIFY_W, 1.0, profile=prof, devices="1xA40", verify_requests=200)
    assert v.search.replay_requests == 200
    assert v.search.replay_latency_s == run_simulated(v, prof, num_requests=200).latency_s <= 1.0
    assert v.estimate.latency_s <= 1.0 and v.estimate.throughput_seq_s < plain.estimate.throughput_seq_s
    assert Plan.from_json(v.to_json()) == v
    # Where the pick's replay already keeps the bound, verifying changes nothing.
    loose = find_schedule(VERIFY_W, 4.0, profile=prof, devices="1xA40", verify_requests=200)
    assert loose.schedule == find_schedule(VERIFY_W, 4.0, profile=prof, devices="1xA40").schedule


def test_verified_infeasible_bound_names_one_the_replay_keeps():
    prof = make_profile()
    with pytest.raises(InfeasibleBoundError, match=r"smallest feasible bound is [\d.]+ s \(the worst of 200 replayed "
                                                   r"requests of the lowest-latency schedule\)") as e:
        find_schedule(VERIFY_W, 0.9, profile=prof, devices="1xA40", verify_requests=200)
    smallest = e.value.smallest_feasible_s
    v = find_schedule(VERIFY_W, smallest * (1 + 1e-9), profile=prof, devices="1xA40", verify_requests=200)
    assert v.search.replay_latency_s <= smallest * (1 + 1e-9)


@pytest.mark.parametrize("bad", [-1, 2.5, True, "10"])
def test_bad_verify_requests_is_named(bad):
    with pytest.raises(ExeGPTError, match=rf"verify_requests={bad!r} must be a whole number >= 0"):
        find_schedule(VERIFY_W, 4.0, profile=make_profile(), devices="1xA40", verify_requests=bad)


def test_a_searched_waa_split_keeps_waa_when_every_device_is_used():
    """GPT-3 341B on 48xA40, task S at 4x its smallest bound: the paper's split rule (the floor or ceiling of the
    memory share at each B_E) leaves WAA-M no plan on all 48 devices, though it has one on 44; with the split
    searched, all 48 devices do at least as well as the rule on 44, and the split is one the rule never allows. The
    default searches the split wherever the device counts are forced."""
    w = Workload.task("S")
    kw = dict(model="gpt3-341b", devices="48xA40", policies=["waa_m"])
    rule, searched = SearchSpace(16, 32, waa_split="rule"), SearchSpace(16, 32, waa_split="searched")
    with pytest.raises(InfeasibleBoundError):
        find_schedule(w, 46.33, device_counts=(48,), space=rule, **kw)
    on44 = find_schedule(w, 46.33, device_counts=(44,), space=rule, **kw)
    on48 = find_schedule(w, 46.33, device_counts=(48,), space=searched, **kw)
    assert on48.schedule.num_gpus == 48 and on48.estimate.latency_s <= 46.33
    assert on48.estimate.throughput_seq_s >= on44.estimate.throughput_seq_s
    default = find_schedule(w, 46.33, device_counts=(48,), space=SearchSpace(16, 32), **kw)
    assert default.schedule == on48.schedule
    from exegpt.policies.waa import split_options
    prob = problem(w, 46.33, model="gpt3-341b", devices="48xA40")
    lo, hi = split_options(prob, Policy.WAA_M, np.array([on48.schedule.encode_batch]))
    assert on48.schedule.encode_gpus not in (int(lo[0]), int(hi[0]))
    with pytest.raises(ExeGPTError, match="waa_split='even' must be 'auto', 'rule' or 'searched'"):
        SearchSpace(waa_split="even")


def test_each_policys_best_on_request_and_the_same_pick_without():
    """By default one branch and bound over every box policy (no per-policy report); ``per_policy=True`` searches
    each on its own: the same pick, and each box policy's best equal to a search of that policy alone."""
    w = Workload.task("S")
    plan = find_schedule(w, 7.6, devices="4xA40")
    assert plan.search.per_policy == ()
    each = find_schedule(w, 7.6, devices="4xA40", per_policy=True)
    assert each.schedule == plan.schedule and each.estimate == plan.estimate
    reached = dict(each.search.per_policy)
    assert {"rra", "waa_c", "waa_m", "cb", "chunked", "disagg", "shift"} <= set(reached)
    for p in ("rra", "waa_c", "waa_m"):
        alone = find_schedule(w, 7.6, devices="4xA40", policies=[p])
        assert reached[p] == alone.estimate.throughput_seq_s
    assert max(reached.values()) == plan.estimate.throughput_seq_s


def test_the_default_policy_set_plans_an_encoder_decoder_model():
    """Every registered policy is searched by default; those that cannot run T5 (Shift Parallelism's Ulysses)
    offer no candidates instead of failing the search."""
    plan = find_schedule(Workload.task("S"), 20.0, model="t5-11b", devices="2xA40")
    assert plan.model == "t5-11b" and plan.estimate.latency_s <= 20.0
    assert plan.schedule.policy.value != "shift"
