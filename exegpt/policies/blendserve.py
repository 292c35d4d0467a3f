"""BlendServe: offline batch inference ordered by resource use while keeping prefix sharing.

The pool is known in advance (offline; throughput is the objective). Every step runs as chunked prefill does
(``exegpt.policies.chunked``: the running decodes first, then prompt chunks within ``token_budget``), with a radix
prefix cache (``exegpt.radix``) of ``prefix_tokens`` tokens: a new request's row starts with what the cache holds
of its prompt and only the rest is prefilled. What differs is which waiting request comes next (``order``):
  * ``blend`` (BlendServe): a fraction ``sample_frac`` of the pool runs first (the sampled requests lead the
    admissions; meanwhile the rest goes depth first) and their output lengths estimate every subtree's, once half
    of them are done (a running one counts with what it generated so far) and again once all are; the prompt tree
    (``exegpt.blend_tree``) is then sorted by density at every node and split where recomputing a prefix costs at
    most ``split_t`` tokens, and a dual scan admits from both ends of that order: compute-heavy from the left,
    memory-heavy from the right, each side's share of the KV pool chosen so the running batch's density is the
    pool's (Alg. 3);
  * ``dfs``: depth first over the prompt tree (SGLang's order, prefix sharing only);
  * ``density``: the same sampling and dual scan over requests ordered by their own density (no tree, no care for
    sharing; NanoFlow-Balance);
  * ``fcfs``: arrival order (vLLM).
A new request whose prompt shares a prefix, not yet cached, with one being prefilled waits for that one to finish
its prompt, the scan taking the next request instead (SGLang's in-batch prefix rule), so the prefix is computed
once.

Knobs: ``order``, ``sample_frac``, ``split_t``, ``max_num_seqs`` (S, the batch size), ``token_budget``,
``prefix_tokens``, ``block_size``, ``kappa``, ``overlap`` (simulated only), TP (RRA's layouts). The estimate is
chunked prefill's; the policy is searched on the simulated engine (``candidates``).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from ..blend_tree import ORDERS, PromptTree, dual_shares, machine_kappa, make_order
from ..errors import ExeGPTError
from ..problem import Problem
from ..rules import SteadyMarker, split_even
from ..schedule import Policy, check_tp, one_pipeline_roles, stage_degrees, with_tp_defaults
from ..stages import Layout, Terms, tp_gpu_counts
from . import cb, chunked
from .base import MAIN, Chunk, Decode, DriverStats, Evict, Prefill, View, WaitArrival, drop_finished

NAMES = (Policy.BLEND,)


@dataclass(frozen=True, slots=True)
class BlendSchedule:
    """BlendServe's knobs (and its baselines' through ``order``)."""

    token_budget: int
    """T: decode rows plus prompt-chunk tokens of one step."""
    max_num_seqs: int
    """S: requests decoding or being prefilled at most (the batch size)."""
    tp: int
    tp_gpus: int
    num_gpus: int
    order: str = "blend"
    """``blend``, ``dfs``, ``density`` or ``fcfs`` (module docstring)."""
    sample_frac: float = 0.01
    """p_s in (0, 1]: the share of the pool run first to estimate output lengths (at least one request)."""
    split_t: float = 0.0
    """Prompt tokens the split may recompute (>= 0; 0: only the prompt tree's top level is reordered)."""
    prefix_tokens: int = 8192
    """Tokens the prefix cache holds (0: none)."""
    block_size: int = 16
    kappa: float = 0.0
    """The model on the device in density units (``exegpt.blend_tree``); 0: from the devices' peak FLOP/s and
    bandwidth (``machine_kappa``); ``blend_tree.profile_kappa`` reads it off a profile."""
    overlap: bool = False
    """Simulated engine: price a step's prompt chunks as overlapped with its decode iteration (``Chunk.overlap``,
    NanoFlow's operator overlap BlendServe runs on); the runner runs them one after the other."""
    policy: Policy = Policy.BLEND

    def __post_init__(self):
        if isinstance(self.max_num_seqs, bool) or not isinstance(self.max_num_seqs, int) or self.max_num_seqs < 1:
            raise ExeGPTError(f"BlendServe: max_num_seqs={self.max_num_seqs!r} must be a whole number >= 1")
        if not isinstance(self.token_budget, int) or self.token_budget <= self.max_num_seqs:
            raise ExeGPTError(f"BlendServe: token_budget={self.token_budget!r} must exceed max_num_seqs="
                              f"{self.max_num_seqs}, or a step full of decodes leaves no token for a prompt chunk")
        if self.order not in ORDERS:
            raise ExeGPTError(f"BlendServe: order={self.order!r} unknown; expected one of {', '.join(ORDERS)}")
        if isinstance(self.sample_frac, bool) or not isinstance(self.sample_frac, (int, float)) \
                or not 0.0 < self.sample_frac <= 1.0:
            raise ExeGPTError(f"BlendServe: sample_frac={self.sample_frac!r} must be a fraction in (0, 1]")
        if isinstance(self.split_t, bool) or not isinstance(self.split_t, (int, float)) \
                or not 0.0 <= self.split_t < math.inf:
            raise ExeGPTError(f"BlendServe: split_t={self.split_t!r} must be a finite number of tokens >= 0")
        if isinstance(self.prefix_tokens, bool) or not isinstance(self.prefix_tokens, int) or self.prefix_tokens < 0:
            raise ExeGPTError(f"BlendServe: prefix_tokens={self.prefix_tokens!r} must be a whole number >= 0")
        if isinstance(self.kappa, bool) or not isinstance(self.kappa, (int, float)) or not 0 <= self.kappa < math.inf:
            raise ExeGPTError(f"BlendServe: kappa={self.kappa!r} must be a finite number >= 0 (0: from the devices)")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ExeGPTError(f"BlendServe: block_size={self.block_size!r} must be a whole number >= 1")
        check_tp(self.tp, self.tp_gpus, self.num_gpus, "BlendServe")
        if self.policy is not Policy.BLEND:
            raise ExeGPTError(f"BlendSchedule has policy {self.policy!r}")

    @property
    def stages(self) -> tuple[int, ...]:
        return stage_degrees(self.num_gpus, self.tp, self.tp_gpus)

    @property
    def as_chunked(self) -> chunked.ChunkedSchedule:
        """Chunked prefill with the same caps (the step rule, its estimate and KV pool)."""
        return chunked.ChunkedSchedule(self.token_budget, self.max_num_seqs, self.tp, self.tp_gpus, self.num_gpus,
                                       self.block_size)


def layout(prob: Problem, s: BlendSchedule) -> Layout | None:
    lay = chunked.layout(prob, s.as_chunked)
    return None if lay is None else Layout(Policy.BLEND, lay.tp, lay.tp_gpus, lay.encode_gpus, lay.decode_gpus,
                                           lay.stages)


def estimate_detail(prob: Problem, lay: Layout, s: BlendSchedule) -> tuple[Terms, int]:
    """Chunked prefill's terms at the same caps (the order and the cache are the simulated engine's to price)."""
    return chunked.estimate_detail(prob, lay, s.as_chunked)


spaces = cb.spaces  # no box function: searched on the simulated engine (``candidates``)


def candidates(prob: Problem, tps: list[int], grid: int) -> list[BlendSchedule]:
    """The knobs BlendServe searches: the batch size S (geometric up to 256), the split threshold (0, one or four
    mean prompts) and the sampling fraction (1 % and 5 %), every TP layout of RRA's."""
    n = prob.cluster.count
    seqs = sorted({int(x) for x in np.round(np.geomspace(4, 256, max(grid // 2, 2)))})
    mean_in = float(prob.stats.in_mean)
    out = []
    for t in tps:
        for g in tp_gpu_counts(n, t):
            out += [BlendSchedule(sq + 512, sq, t, g, n, "blend", frac, split)
                    for sq in seqs for split in (0.0, mean_in, 4 * mean_in) for frac in (0.01, 0.05)]
    return out


def parse(policy, fields: dict, num_gpus: int) -> BlendSchedule:
    """A schedule from CLI fields (``token_budget``, ``max_num_seqs``, ``order``, ``sample_frac``, ``split_t``,
    ``prefix_tokens``, ``block_size``, ``tp``, ``tp_gpus``)."""
    return BlendSchedule(num_gpus=num_gpus, **with_tp_defaults(fields, num_gpus))


def describe(s: BlendSchedule) -> str:
    knobs = f" p_s={s.sample_frac:g} t={s.split_t:g}" if s.order in ("blend", "density") else ""
    return f"BlendServe-{s.order}{knobs} T={s.token_budget} S={s.max_num_seqs} TP{s.tp}x{s.tp_gpus}" \
        + (" overlap" if s.overlap else "")


stage_roles = one_pipeline_roles


def from_fields(fields: dict) -> BlendSchedule:
    return BlendSchedule(**fields)


cache_rows = cb.cache_rows


def prefix_cache_tokens(plan) -> int:
    """Tokens of the engines' prefix cache (``policies.prefix_cache``)."""
    return plan.schedule.prefix_tokens


# --- driver -------------------------------------------------------------------------------------------

LOOKAHEAD = 64
"""Requests a scan looks past for one whose prefix is not being prefilled (SGLang's in-batch prefix rule)."""


def _shares(a: tuple[int, ...], b: tuple[int, ...], k: int) -> bool:
    """Whether ``a`` and ``b`` share their first ``k`` tokens."""
    return len(a) >= k and len(b) >= k and a[0] == b[0] and a[:k] == b[:k]


class _Queue:
    """The waiting requests in the schedule's order, taken from the left (and, once the sampled outputs are in,
    from the right by the dual scan)."""

    def __init__(self, s: BlendSchedule, kappa: float):
        self.s, self.kappa = s, kappa
        self.seq: deque[int] = deque()
        self.info: dict[int, tuple[float, float]] = {}  # request -> (density, footprint)
        self.comp: dict[int, float] = {}
        self.mem: dict[int, float] = {}
        self.known: set[int] = set()
        self.sampled: list[int] = []
        self.blending = False
        self.side: dict[int, tuple[int, float]] = {}  # admitted request -> side (0 left, 1 right), footprint

    def refresh(self, view: View, est: dict[int, float] | None = None) -> None:
        """(Re)orders the requests waiting (``est``: the output estimates, for ``blend`` and ``density``)."""
        waiting = view.waiting()
        kind = self.s.order
        if est is None and kind in ("blend", "density"):
            kind = "dfs"  # until the sampled outputs are in
        prompts = {r: view.prompt(r) for r in waiting}
        mean = float(np.mean(list(est.values()))) if est else 1.0
        guess = {r: (est or {}).get(r, mean) for r in prompts}  # a late arrival: the pool's mean
        o = make_order(kind, prompts, guess, self.kappa, self.s.split_t)
        first = self.sampled_waiting(view)
        taken = set(first)
        self.seq = deque(first + [r for r in o.rids if r not in taken])
        self.info = {r: (d, f) for r, d, f in zip(o.rids, o.density, o.footprint)}
        self.comp, self.mem = dict(zip(o.rids, o.comp)), dict(zip(o.rids, o.mem))
        self.known = set(waiting)
        self.blending = est is not None and kind in ("blend", "density")

    def sampled_waiting(self, view: View) -> list[int]:
        w = set(view.waiting())
        return [r for r in self.sampled if r in w]

    def shares(self) -> tuple[float, float]:
        """The dual scan's shares of KV memory (left, right)."""
        if not self.blending or len(self.seq) < 2:
            return 1.0, 0.0
        left, right = self.info[self.seq[0]][0], self.info[self.seq[-1]][0]
        mem = sum(self.mem[r] for r in self.seq)
        pool = sum(self.comp[r] for r in self.seq) / mem if mem else 0.0
        return dual_shares(left, right, pool)


def drivers(plan) -> dict:
    """The one driver of a BlendServe plan, on the ``main`` group."""
    s = plan.schedule
    pool_blocks = cb.pool_blocks(plan)
    kappa = s.kappa or machine_kappa(plan.model, plan.devices)

    def drive(view: View):
        p, size = view.num_stages, s.block_size

        def blocks(tokens: int) -> int:
            return -(-tokens // size)

        decoding: list[int] = []
        prefilling: dict[int, int] = {}
        preempted: deque[int] = deque()
        enc: list[float] = []
        dec: list[tuple[float, int]] = []
        steady = SteadyMarker(enc, dec)
        q = _Queue(s, kappa)
        est: dict[int, float] | None = None
        seen = 0  # sampled requests finished at the last estimate
        side_mem = [0.0, 0.0]

        def held() -> int:
            return sum(blocks(view.input_len(r) + view.generated(r)) for r in decoding) + \
                sum(blocks(done) for done in prefilling.values())

        while decoding or prefilling or preempted or view.waiting() or view.more_to_come():
            waiting = view.waiting()
            if not q.known and waiting:  # the pool's first look: draw the sample
                rng = np.random.default_rng(len(waiting))
                k = max(1, math.ceil(s.sample_frac * len(waiting))) if s.order in ("blend", "density") else 0
                q.sampled = sorted(int(r) for r in rng.choice(waiting, size=min(k, len(waiting)), replace=False))
                q.refresh(view)
            elif set(waiting) - q.known:
                q.refresh(view, est)
            finished = sum(view.done(r) for r in q.sampled)
            if q.sampled and finished > seen and (2 * finished >= len(q.sampled) > 2 * seen
                                                  or finished == len(q.sampled)):
                # Half the sample is in, then all of it: estimate from it (a sampled request still running has
                # generated at least as many tokens as it has so far) and reorder what still waits.
                seen = finished
                sampled = {r: view.generated(r) for r in q.sampled}
                rest = view.waiting()
                est = PromptTree([view.prompt(r) for r in rest + q.sampled], rest + q.sampled).estimate_outputs(sampled)
                q.refresh(view, est)
            before = set(decoding)
            decoding = yield from drop_finished(view, decoding)
            for r in before - set(decoding):
                if r in q.side:
                    i, foot = q.side.pop(r)
                    side_mem[i] -= foot
            while len(decoding) > 1 and held() + sum(1 for r in decoding
                                                     if (view.input_len(r) + view.generated(r)) % size == 0) \
                    > pool_blocks:
                victim = decoding.pop()
                yield Evict((victim,))
                preempted.appendleft(victim)
            budget = s.token_budget
            if decoding:
                t = view.now()
                steps = yield Decode(tuple(tuple(mb) for mb in split_even(decoding, p)), 1)
                dec.append((view.now() - t, steps[0] if steps else 0))
                budget -= len(decoding)
            back = []
            while preempted and len(decoding) + len(prefilling) + len(back) < s.max_num_seqs and \
                    held() + sum(blocks(view.input_len(r) + view.generated(r)) for r in back + [preempted[0]]) \
                    <= pool_blocks:
                back.append(preempted.popleft())
            if back:
                yield Prefill(tuple(back), min(p, len(back)), resume=True)
                decoding += back
            items, free = [], pool_blocks - held()
            for r, done in prefilling.items():
                c = min(budget, view.input_len(r) - done)
                if c <= 0:
                    break
                items.append((r, done, c))
                budget -= c
                free -= blocks(done + c) - blocks(done)
            # New requests by the dual scan: the side further below its share of the KV pool goes next.
            pending = [view.prompt(r) for r in prefilling]  # prompts whose prefixes are not cached yet
            shares = q.shares()
            total = pool_blocks * size if pool_blocks < 1 << 59 else s.max_num_seqs * view.max_len
            stuck = [False, False]
            new = 0
            while q.seq and not all(stuck) and budget > 0 \
                    and len(decoding) + len(prefilling) + new < s.max_num_seqs:
                use = [side_mem[i] / (shares[i] * total) if shares[i] > 0 and not stuck[i] else math.inf
                       for i in (0, 1)]
                i = int(np.argmin(use))
                if math.isinf(use[i]):
                    break
                for j in range(min(LOOKAHEAD, len(q.seq))):
                    at = j if i == 0 else len(q.seq) - 1 - j
                    r = q.seq[at]
                    prompt, m = view.prompt(r), view.cached_prefix(r)
                    # Its prefix is being prefilled: it waits (it reads it from the cache next step).
                    if not s.prefix_tokens or not any(_shares(prompt, o, m + size) for o in pending):
                        break
                else:
                    stuck[i] = True
                    continue
                c = min(budget, view.input_len(r) - m)
                if blocks(m + c) > free:
                    break
                del q.seq[at]
                items.append((r, m, c))
                pending.append(prompt)
                budget -= c
                free -= blocks(m + c)
                new += 1
                foot = q.info.get(r, (0.0, float(view.input_len(r))))[1]
                q.side[r] = (i, foot)
                side_mem[i] += foot
            if q.seq and len(decoding) + len(prefilling) + new >= s.max_num_seqs:
                steady.begin(view.now())
            elif waiting and not q.seq:
                steady.end(view.now())
            if items:
                t = view.now()
                yield Chunk(tuple(items), min(p, len(items)), overlap=s.overlap and bool(decoding))
                enc.append(view.now() - t)
                for r, start, c in items:
                    if start + c == view.input_len(r):
                        prefilling.pop(r, None)
                        decoding.append(r)
                    else:
                        prefilling[r] = start + c
            elif not decoding and not back:
                if not view.waiting() and not preempted:
                    if view.more_to_come():
                        yield WaitArrival()
                elif not prefilling:
                    raise ExeGPTError(f"BlendServe: the KV pool of {pool_blocks} blocks of {size} tokens holds no "
                                      f"waiting request")
        return DriverStats(tuple(enc), tuple(dec), steady.window(view.now()))

    return {MAIN: drive}
