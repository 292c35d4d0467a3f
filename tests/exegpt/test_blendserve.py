"""BlendServe: the radix prefix cache, the prompt tree and its orders, the shared-prefix pools, the dual scan, and
the policy on the simulated engine."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import pytest

from exegpt import Profile, Workload, evaluate_schedule, run_simulated
from exegpt.blend_tree import PromptTree, dual_shares, machine_kappa, make_order, sharing_ratio
from exegpt.errors import ExeGPTError
from exegpt.policies.blendserve import BlendSchedule
from exegpt.prefix_workload import PoolOptions, PrefixPool, shared_prefix_pool
from exegpt.radix import PrefixCache, RadixCache
from exegpt.report import FINISHED

PROFILE = Path(__file__).resolve().parents[1] / "data" / "tiny-cpu.json"


def planted(seed: int = 0):
    """Prompts with planted shared prefixes: 4 templates of 12 tokens, each request a template's first 3..12 tokens
    and 1..6 of its own."""
    rng = random.Random(seed)
    heads = [tuple(rng.randrange(1000) for _ in range(12)) for _ in range(4)]
    return [heads[i % 4][:rng.randrange(3, 13)] + tuple(rng.randrange(1000) for _ in range(rng.randrange(1, 7)))
            for i in range(40)]


def test_radix_cache_keeps_what_running_requests_read_and_evicts_lru():
    prompts = planted()
    cache = PrefixCache(60, lambda r: prompts[r])
    prefilling: list[int] = []  # admitted, prompts not yet in: they hold the prefix they started from
    for r in range(len(prompts)):
        cache.admit(r, cache.cached(r))
        prefilling.append(r)
        if len(prefilling) > 3:
            cache.publish(prefilling.pop(0))  # inserting evicts what no request holds
        cache.tree.check()
        for q in prefilling:  # eviction never dropped a prefix a running request still reads
            assert cache.tree.match_len(prompts[q][:cache.held[q]]) == cache.held[q]
    assert cache.tree.evicted > 0 and cache.hit_tokens > 0
    # Least recently used first: of two unlocked leaves the one untouched longest goes.
    tree = RadixCache(8)
    tree.insert((1, 2, 3, 4))
    tree.insert((5, 6, 7, 8))
    tree.path((1, 2, 3, 4))  # touched: now the newer
    _, segs = tree.insert((9, 9))
    assert [len(s) for _, s in segs] == [2] and tree.match_len((1, 2, 3, 4)) == 4 and tree.match_len((5,)) == 0
    # A locked path stays even when the pool is full: the insert gets what is left (nothing).
    tree.lock((1, 2, 3, 4))
    tree.lock((9, 9))
    _, segs = tree.insert((7, 7, 7, 7, 7))
    assert [(start, len(s)) for start, s in segs] == [(0, 2)] and tree.match_len((7,) * 5) == 2
    assert tree.match_len((1, 2, 3, 4)) == 4 and tree.match_len((9, 9)) == 2
    tree.check()
    # A request's start must be what the cache holds; the whole prompt is never skipped (its last token's logits).
    r = next(r for r in range(len(prompts)) if cache.cached(r))
    with pytest.raises(ExeGPTError, match=f"request {r}: a chunk starts at 0"):
        cache.admit(r, 0)
    assert all(cache.cached(r) < len(prompts[r]) for r in range(len(prompts)))


def test_prompt_tree_orders_and_dual_scan():
    prompts = planted(1)
    rids = list(range(len(prompts)))
    tree = PromptTree(prompts)
    # Every request in exactly one leaf; shared prefixes counted once.
    assert sorted(r for n in tree.nodes() for r in n.rids) == rids
    distinct = len({q[:i] for q in prompts for i in range(1, len(q) + 1)})  # distinct prefixes = tokens once
    assert tree.distinct_tokens == distinct
    assert sharing_ratio(prompts) == pytest.approx(1 - distinct / sum(map(len, prompts)))
    rng = np.random.default_rng(0)
    est = {r: float(rng.integers(1, 200)) for r in rids}
    kappa = 60.0
    orders = {k: make_order(k, dict(zip(rids, prompts)), est, kappa, 0) for k in ("fcfs", "dfs", "density", "blend")}
    for o in orders.values():
        assert sorted(o.rids) == rids
    assert orders["fcfs"].rids == tuple(rids)
    dens = np.array(orders["density"].density)
    assert (np.diff(dens) <= 0).all()

    def runs(order):  # how often consecutive requests switch template
        return sum(prompts[a][0] != prompts[b][0] for a, b in zip(order.rids, order.rids[1:]))

    # DFS and the blend without splits keep each template contiguous; splitting everything gives up the tree.
    assert runs(orders["dfs"]) == runs(orders["blend"]) == 3
    free = make_order("blend", dict(zip(rids, prompts)), est, kappa, 1e9)
    assert free.splits > 0 and (np.diff(free.density) <= 1e-12).all() and runs(free) > 3
    # Alg. 3: the shares blend to the pool's density; Fig. 6's 60 GB split.
    fl, fr = dual_shares(3.73, 0.096, 1.27)
    assert fl + fr == pytest.approx(1, abs=1e-12) and 3.73 * fl + 0.096 * fr == pytest.approx(1.27, abs=1e-12)
    assert (60 * fl, 60 * fr) == pytest.approx((19.38, 40.62), abs=0.01)
    assert dual_shares(1.0, 0.5, 2.0) == (1.0, 0.0)


def test_shared_prefix_pools_hit_their_targets():
    kappa = machine_kappa("llama-2-7b", "1xA100")
    for sharing, density in ((0.05, 1.4), (0.35, 0.9)):
        pool = shared_prefix_pool(PoolOptions(300, sharing, density, kappa, 2048, 32000, seed=2))
        assert pool.sharing == pytest.approx(sharing, abs=0.02) and pool.density == pytest.approx(density, rel=0.05)
        assert len(pool) == 300 and pool.lengths.sum(axis=1).max() <= 2048
        assert pool.sharing == pytest.approx(sharing_ratio(pool.prompts))


def test_bad_input_gets_one_clear_line():
    for kw, what in (({"sample_frac": 0.0}, "sample_frac=0.0"), ({"sample_frac": 1.5}, "sample_frac=1.5"),
                     ({"split_t": -1.0}, "split_t=-1.0"), ({"order": "lifo"}, "order='lifo'")):
        with pytest.raises(ExeGPTError, match=what) as e:
            BlendSchedule(64, 8, 1, 0, 1, **kw)
        assert "\n" not in str(e.value)
    with pytest.raises(ExeGPTError, match="no requests"):
        PoolOptions(0, 0.1, 1.0, 60.0, 256, 1000)
    with pytest.raises(ExeGPTError, match="at least one request"):
        PrefixPool((), (), 0.0, 0.0)


def test_orders_on_the_simulated_engine_keep_sharing_and_finish_every_request():
    """A shared pool on the simulated engine: every request finishes; the prefix cache skips prompt tokens, no
    more than a perfect cache would; with a cache smaller than the pool's prefixes the order decides how much:
    DFS and the blend keep most, the density order less, arrival order least."""
    prof = Profile.load(PROFILE)
    pool = shared_prefix_pool(PoolOptions(120, 0.35, 3.0, machine_kappa("tiny", "1xcpu"), 96, 256, seed=4))
    W = Workload.from_pairs(pool.lengths.tolist())
    optimal = pool.sharing * pool.lengths[:, 0].sum()
    got = {}
    for order, cache in (("fcfs", 300), ("dfs", 300), ("density", 300), ("blend", 300), ("blend", 0)):
        s = BlendSchedule(72, 8, 1, 0, 1, order=order, sample_frac=0.05, split_t=24.0, prefix_tokens=cache,
                          block_size=8)
        plan = evaluate_schedule(s, W, profile=prof, devices="1xcpu")
        plan = dataclasses.replace(plan, estimate=dataclasses.replace(plan.estimate, kv_tokens=600.0))
        rep = run_simulated(plan, prof, lengths=pool.lengths, prompts=pool.prompts)
        assert rep.num_finished == len(pool) and all(r.status == FINISHED for r in rep.requests)
        assert rep.cached_tokens <= optimal
        got[order, cache] = rep
    assert got["blend", 0].cached_tokens == 0
    assert got["dfs", 300].cached_tokens >= 0.9 * optimal and got["blend", 300].cached_tokens >= 0.9 * optimal
    assert got["fcfs", 300].cached_tokens < got["density", 300].cached_tokens < got["dfs", 300].cached_tokens
    assert got["blend", 300].makespan_s < got["blend", 0].makespan_s  # what was cached was not recomputed
