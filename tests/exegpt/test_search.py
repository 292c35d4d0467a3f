"""The search returns the exhaustive optimum of the same space (randomized cases), and the generic
branch and bound is exact on closed-form fakes."""

import dataclasses
import math

import numpy as np
import pytest

from exegpt import InfeasibleBoundError, SearchSpace, Workload, exhaustive_schedule, find_schedule
from exegpt.gpu_data import builtin_profile
from exegpt.search import Space, branch_and_bound, exhaustive
from exegpt.search.optimize import BOX_POLICIES

from .conftest import make_profile

MODELS = [("opt-13b", (1, 2, 4)), ("llama-2-7b", (1, 2, 4)), ("t5-11b", (1, 2, 4)), ("gpt3-39b", (1, 2, 4, 8))]


def _case(seed: int):
    rng = np.random.default_rng(seed)
    model, tps = MODELS[seed % len(MODELS)]
    n = int(rng.choice([1, 2, 3, 4, 8])) if model != "gpt3-39b" else int(rng.choice([4, 8]))
    device = "A100" if model == "gpt3-39b" else str(rng.choice(["A40", "A100"]))
    if seed % 3 == 0:
        w = Workload.task(str(rng.choice(["S", "C1"])))
    else:
        inp = (rng.uniform(16, 300), rng.uniform(5, 200), int(rng.integers(64, 600)))
        out = (rng.uniform(4, 60), rng.uniform(1, 40), int(rng.integers(8, 120)))
        w = Workload.truncated_normal(*((m, s, max(mx, math.ceil(m))) for m, s, mx in (inp, out)),  # max >= mean
                                      name=f"random{seed}")
    if seed % 2 == 0:
        profile = make_profile(model, device, tps=[t for t in tps if t <= n], seed=seed, noise=0.15,
                               padded=seed % 4 == 0, handoff_on_compute=seed % 8 == 2)
    else:
        profile = builtin_profile(model, device)
    return model, f"{n}x{device}", w, profile


SPACE = SearchSpace(max_encode_batch=40, max_micro_batch=48)
SEARCHED_SPLIT = (1, 10, 22, 27)  # cases of 3 and 4 devices, WAA searched on every split


@pytest.mark.parametrize("seed", range(32))  # every combination of the case rules (period 24) at least once
def test_search_equals_exhaustive(seed):
    model, devices, w, profile = _case(seed)
    rng = np.random.default_rng(1000 + seed)
    space = dataclasses.replace(SPACE, waa_split="searched") if seed in SEARCHED_SPLIT else SPACE
    kw = dict(model=model, devices=devices, profile=profile, space=space, policies=BOX_POLICIES)
    try:
        exhaustive_schedule(w, math.inf, **kw)
    except InfeasibleBoundError:
        pytest.skip("the model does not fit this cluster at all")  # rare: e.g. gpt3-39b on too few devices
    # A bound between the fastest feasible latency and the unconstrained optimum's latency.
    lo = find_schedule(w, math.inf, **kw).estimate.latency_s
    fastest = _smallest(w, kw)
    bound = float(fastest + rng.uniform(0, 1.2) * (lo - fastest)) if lo > fastest else lo
    got = find_schedule(w, bound, **kw)
    best = exhaustive_schedule(w, bound, **kw)
    assert got.estimate.throughput_seq_s == pytest.approx(best.estimate.throughput_seq_s, rel=1e-9)
    assert got.estimate.latency_s <= bound
    assert got.estimate.memory_ok
    assert got.search.candidates_evaluated < best.search.candidates_evaluated


def _smallest(w, kw):
    from exegpt import smallest_feasible_bound
    return smallest_feasible_bound(w, **kw)


def test_infeasible_bound_names_the_smallest_feasible_bound():
    w = Workload.task("S")
    p = make_profile()
    fastest = _smallest(w, dict(profile=p, devices="4xA40"))
    with pytest.raises(InfeasibleBoundError, match=f"smallest feasible bound is {fastest:.4g} s") as e:
        find_schedule(w, fastest * 0.99, profile=p, devices="4xA40")
    assert e.value.smallest_feasible_s == pytest.approx(fastest)
    # ... and that bound is feasible.
    plan = find_schedule(w, e.value.smallest_feasible_s * (1 + 1e-9), profile=p, devices="4xA40")
    assert plan.estimate.latency_s <= fastest * (1 + 1e-9)


@pytest.mark.parametrize("model,devices,counts,split", [("opt-13b", "4xA40", None, "searched"),
                                                        ("t5-11b", "8xA40", (8,), "rule"),
                                                        ("gpt3-39b", "8xA100", (6, 8), "searched")])
def test_prebounds_hold_every_point_of_their_space(model, devices, counts, split):
    """A space's cheap prebound (what the search queues before pricing its layout) is at least the throughput of
    every point that fits and at most the latency of every one, on every space of every device count."""
    from exegpt.problem import problem
    from exegpt.search.bnb import grid_values
    from exegpt.search.optimize import all_spaces
    prob = problem(Workload.task("C1"), math.inf, model=model, devices=devices)
    checked = 0
    for _, _, sp in all_spaces(prob, space=SearchSpace(16, 24, waa_split=split), device_counts=counts):
        up, lat_lo = sp.prebound()
        _, thr, lat, ok = grid_values(sp)
        if ok.any():
            assert thr[ok].max() <= up * (1 + 1e-12) and lat[ok].min() >= lat_lo * (1 - 1e-12)
            checked += 1
    assert checked > 3


def test_smallest_bound_equals_exhaustive_minimum_latency():
    w = Workload.task("C1")
    p = make_profile(noise=0.1, seed=3)
    from exegpt.problem import problem
    from exegpt.search.optimize import build_spaces
    prob = problem(w, math.inf, profile=p, devices="4xA40")
    spaces = [s for _, s in build_spaces(prob, space=SPACE)]
    ref = exhaustive(spaces, math.inf, minimize_latency=True)
    got = branch_and_bound(spaces, math.inf, minimize_latency=True)
    assert got.latency == pytest.approx(ref.latency, rel=1e-12)


# --- the generic branch and bound on closed-form fakes -------------------------------------------

def _fake(a, b, c):
    """thr = x^a y^b / (1 + c x y), lat = x + 3y: monotone in both axes; box bounds from corners."""
    def f(lo, hi):
        thr_hi = hi[:, 0] ** a * hi[:, 1] ** b / (1 + c * lo[:, 0] * lo[:, 1])
        lat_lo = lo[:, 0] + 3.0 * lo[:, 1]
        return thr_hi, lat_lo, np.ones(len(lo), dtype=bool)
    return f


@pytest.mark.parametrize("seed", range(10))
def test_branch_and_bound_on_closed_form_fakes(seed):
    rng = np.random.default_rng(seed)
    spaces = [Space(_fake(*rng.uniform(0.2, 1.5, 3)), (1, 1), tuple(int(v) for v in rng.integers(5, 90, 2)))
              for _ in range(3)]
    bound = float(rng.uniform(10, 150))
    got, ref = branch_and_bound(spaces, bound), exhaustive(spaces, bound)
    assert got.throughput == pytest.approx(ref.throughput, rel=1e-12)
    assert got.latency <= bound


def test_tolerances_can_only_lose_throughput():
    spaces = [Space(_fake(1.0, 0.5, 0.01), (1, 1), (60, 60))]
    exact = branch_and_bound(spaces, 80.0)
    loose = branch_and_bound(spaces, 80.0, eps_throughput=0.2)
    assert loose.throughput <= exact.throughput and loose.throughput >= exact.throughput / 1.2
    assert loose.candidates_evaluated <= exact.candidates_evaluated
