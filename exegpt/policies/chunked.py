"""Chunked prefill (Sarathi-Serve): every step's token budget goes to the running decodes first, then to chunks of
the prompts being prefilled (oldest first) and of new requests, so a long prompt spans several steps and never
stalls the decodes for longer than one budget.

Knobs: ``token_budget`` (T, the tokens of one step: decode rows plus prompt-chunk tokens), ``max_num_seqs`` (S),
``block_size``, TP degree and the devices using it (RRA's layout). KV is accounted in blocks against the pool as in
continuous batching (``exegpt.policies.cb``), with the same recompute preemption of the newest decoding request.

The runner executes a step as a decode iteration of the running requests followed by one prefill of the chunks
(``Chunk``: each row's chunk attends its cached prefix), not as one fused forward; the simulated engine prices it
the same way. The estimate is continuous batching's (approximate); the policy is searched on the simulated engine.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from ..errors import ExeGPTError
from ..problem import Problem
from ..rules import SteadyMarker, split_even
from ..schedule import Policy, check_tp, one_pipeline_roles, stage_degrees, with_tp_defaults
from ..stages import Layout, Terms, tp_gpu_counts
from . import cb
from .base import MAIN, Chunk, Decode, DriverStats, Evict, Prefill, View, WaitArrival, drop_finished

NAMES = (Policy.CHUNKED,)


@dataclass(frozen=True, slots=True)
class ChunkedSchedule:
    """Chunked prefill: ``token_budget`` tokens a step, at most ``max_num_seqs`` requests in flight."""

    token_budget: int
    """T: decode rows plus prompt-chunk tokens of one step (Sarathi's chunk size)."""
    max_num_seqs: int
    """S: requests decoding or being prefilled at most."""
    tp: int
    tp_gpus: int
    num_gpus: int
    block_size: int = 16
    policy: Policy = Policy.CHUNKED

    def __post_init__(self):
        if isinstance(self.max_num_seqs, bool) or not isinstance(self.max_num_seqs, int) or self.max_num_seqs < 1:
            raise ExeGPTError(f"chunked prefill: max_num_seqs={self.max_num_seqs!r} must be a whole number >= 1")
        if not isinstance(self.token_budget, int) or self.token_budget <= self.max_num_seqs:
            raise ExeGPTError(f"chunked prefill: token_budget={self.token_budget!r} must exceed max_num_seqs="
                              f"{self.max_num_seqs}, or a step full of decodes leaves no token for a prompt chunk")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ExeGPTError(f"chunked prefill: block_size={self.block_size!r} must be a whole number >= 1")
        check_tp(self.tp, self.tp_gpus, self.num_gpus, "chunked prefill")

    @property
    def stages(self) -> tuple[int, ...]:
        return stage_degrees(self.num_gpus, self.tp, self.tp_gpus)

    @property
    def as_cb(self) -> cb.CBSchedule:
        """The continuous-batching schedule with the same caps (its estimate and KV pool)."""
        return cb.CBSchedule(self.max_num_seqs, self.token_budget, self.tp, self.tp_gpus, self.num_gpus,
                             self.block_size)


def layout(prob: Problem, s: ChunkedSchedule) -> Layout | None:
    lay = cb.layout(prob, s.as_cb)
    return None if lay is None else Layout(Policy.CHUNKED, lay.tp, lay.tp_gpus, lay.encode_gpus, lay.decode_gpus,
                                           lay.stages)


def estimate_detail(prob: Problem, lay: Layout, s: ChunkedSchedule) -> tuple[Terms, int]:
    """Continuous batching's terms at the same caps (a prompt may span steps, so the budget need not hold it)."""
    if prob.model.max_seq_len % s.block_size:
        raise ExeGPTError(f"chunked prefill: block_size={s.block_size} does not divide {prob.model.name}'s "
                          f"context of {prob.model.max_seq_len} tokens")
    big = cb.CBSchedule(s.max_num_seqs, max(s.token_budget, prob.workload.max_total_len), s.tp, s.tp_gpus,
                        s.num_gpus, s.block_size)
    return cb.estimate_detail(prob, lay, big)


spaces = cb.spaces  # no box function: searched on the simulated engine (``candidates``)


def candidates(prob: Problem, tps: list[int], grid: int) -> list[ChunkedSchedule]:
    """S geometric up to 256, the budget 256, 512 or 2048 tokens above S (Sarathi's chunk sizes)."""
    n = prob.cluster.count
    seqs = sorted({int(x) for x in np.round(np.geomspace(1, 256, grid))})
    out = []
    for t in tps:
        for g in tp_gpu_counts(n, t):
            out += [ChunkedSchedule(sq + chunk, sq, t, g, n) for sq in seqs for chunk in (256, 512, 2048)]
    return out


def parse(policy, fields: dict, num_gpus: int) -> ChunkedSchedule:
    """A schedule from CLI fields (``token_budget``, ``max_num_seqs``, ``block_size``, ``tp``, ``tp_gpus``)."""
    return ChunkedSchedule(num_gpus=num_gpus, **with_tp_defaults(fields, num_gpus))


def describe(s: ChunkedSchedule) -> str:
    return f"chunked T={s.token_budget} S={s.max_num_seqs} B={s.block_size} TP{s.tp}x{s.tp_gpus}"


stage_roles = one_pipeline_roles


def from_fields(fields: dict) -> ChunkedSchedule:
    return ChunkedSchedule(**fields)


cache_rows = cb.cache_rows


# --- driver -------------------------------------------------------------------------------------------

def drivers(plan, sp_at=None) -> dict:
    """The one driver of a chunked-prefill plan, on the ``main`` group. ``sp_at(tokens)``: whether a forward of
    that many tokens runs in the stage's base (SP) mode (Shift Parallelism, ``exegpt.policies.shift``)."""
    s = plan.schedule
    pool_blocks = cb.pool_blocks(plan)
    sp_at = sp_at or (lambda tokens: False)

    def drive(view: View):
        p, size = view.num_stages, s.block_size

        def blocks(tokens: int) -> int:
            return -(-tokens // size)

        decoding: list[int] = []  # prefilled, in admission order: the newest is preempted first
        prefilling: dict[int, int] = {}  # request -> prompt tokens prefilled so far, oldest first
        preempted: deque[int] = deque()
        enc: list[float] = []
        dec: list[tuple[float, int]] = []
        steady = SteadyMarker(enc, dec)

        def held() -> int:  # blocks of everything in the cache
            return sum(blocks(view.input_len(r) + view.generated(r)) for r in decoding) + \
                sum(blocks(done) for done in prefilling.values())

        while decoding or prefilling or preempted or view.waiting() or view.more_to_come():
            decoding = yield from drop_finished(view, decoding)
            # Decodes first: a block for every request whose next token starts one, the newest preempted if short.
            while len(decoding) > 1 and held() + sum(1 for r in decoding
                                                     if (view.input_len(r) + view.generated(r)) % size == 0) \
                    > pool_blocks:
                victim = decoding.pop()
                yield Evict((victim,))
                preempted.appendleft(victim)
            budget = s.token_budget
            if decoding:
                t = view.now()
                steps = yield Decode(tuple(tuple(mb) for mb in split_even(decoding, p)), 1,
                                     sp=sp_at(len(decoding)))
                dec.append((view.now() - t, steps[0] if steps else 0))
                budget -= len(decoding)
            # Preempted requests come back whole (recomputed) when the pool and S allow.
            back = []
            while preempted and len(decoding) + len(prefilling) + len(back) < s.max_num_seqs and \
                    held() + sum(blocks(view.input_len(r) + view.generated(r)) for r in back + [preempted[0]]) \
                    <= pool_blocks:
                back.append(preempted.popleft())
            if back:
                tokens = sum(view.input_len(r) + view.generated(r) - 1 for r in back)
                yield Prefill(tuple(back), min(p, len(back)), resume=True, sp=sp_at(tokens))
                decoding += back
            # Then the chunks: prompts under way, oldest first, then new requests while S and the pool allow.
            items, free = [], pool_blocks - held()
            for r, done in prefilling.items():
                c = min(budget, view.input_len(r) - done)
                if c <= 0:
                    break
                items.append((r, done, c))
                budget -= c
                free -= blocks(done + c) - blocks(done)
            waiting = view.waiting()
            new = 0
            for r in waiting:
                c = min(budget, view.input_len(r))
                if c <= 0 or len(decoding) + len(prefilling) + new >= s.max_num_seqs or blocks(c) > free:
                    break
                items.append((r, 0, c))
                budget -= c
                free -= blocks(c)
                new += 1
            if new < len(waiting) and len(decoding) + len(prefilling) + new >= s.max_num_seqs:
                steady.begin(view.now())
            elif waiting and new == len(waiting):
                steady.end(view.now())
            if items:
                t = view.now()
                yield Chunk(tuple(items), min(p, len(items)), sp=sp_at(sum(c for _, _, c in items)))
                enc.append(view.now() - t)
                for r, start, c in items:
                    if start + c == view.input_len(r):
                        prefilling.pop(r, None)
                        decoding.append(r)
                    else:
                        prefilling[r] = start + c
            elif not decoding and not back:
                # Read off this step's snapshot: on the runner a request may arrive after it, and is then
                # taken by the next step (the simulated engine's clock stands still within a step).
                if not waiting and not preempted:
                    if view.more_to_come():
                        yield WaitArrival()
                else:
                    raise ExeGPTError(f"chunked prefill: the KV pool of {pool_blocks} blocks of {size} tokens holds "
                                      f"no waiting request")
        return DriverStats(tuple(enc), tuple(dec), steady.window(view.now()))

    return {MAIN: drive}
