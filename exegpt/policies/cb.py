"""Continuous (iteration-level) batching, as Orca and vLLM's scheduler run it (without chunked prefill).

Knobs: ``max_num_seqs`` (S, the running requests at most), ``max_num_batched_tokens`` (T, the prompt tokens of
one prefill step at most), ``block_size`` (B, tokens per KV block), TP degree and the devices using it (the
stages of RRA's layout).

The driver, every step: free the rows of finished requests; then, if requests wait (preempted ones first, then
new ones in arrival order), prefill as many as fit under S running, T tokens and the free KV blocks (a prefill
step, vLLM's prefill-first order); else run one decode iteration of every running request in one micro-batch per
stage, first reserving a block for each request whose next token starts one and, while the pool is short,
preempting the newest running request (its rows are freed; it is recomputed later from its prompt and the tokens
it generated, as vLLM's recompute preemption does). KV memory is accounted in blocks of B tokens, as a paged cache
does: the pool is what the devices hold after weights and a step's activations (``Estimate.kv_tokens``); the
runner's physical cache is S rows of the plan's longest context.

The estimate is approximate (the policy is searched on the simulated engine): at saturation about S / E[k]
requests finish per decode iteration, so a step cycle is one decode iteration of S rows and one prefill of
S / E[k] prompts: RRA's estimate at N_D = 1 and B_E = S / E[k], with S capped by the KV pool.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from ..errors import ExeGPTError
from ..memory import activation_bytes, stage_weights
from ..problem import Problem
from ..rules import SteadyMarker, split_even
from ..schedule import Policy, check_tp, one_pipeline_roles, stage_degrees, with_tp_defaults
from ..stages import Layout, Terms, tp_gpu_counts
from . import rra
from .base import MAIN, Decode, DriverStats, Evict, Prefill, View, WaitArrival, drop_finished

NAMES = (Policy.CB,)


@dataclass(frozen=True, slots=True)
class CBSchedule:
    """Continuous batching: at most ``max_num_seqs`` running, ``max_num_batched_tokens`` prompt tokens a prefill
    step, KV in blocks of ``block_size`` tokens."""

    max_num_seqs: int
    """S: running requests at most (vLLM's ``max_num_seqs``)."""
    max_num_batched_tokens: int
    """T: prompt tokens one prefill step takes at most (vLLM's ``max_num_batched_tokens``); at least the longest
    request, which may come back whole after a preemption."""
    tp: int
    tp_gpus: int
    num_gpus: int
    block_size: int = 16
    """B: tokens per KV block."""
    policy: Policy = Policy.CB

    def __post_init__(self):
        if isinstance(self.max_num_seqs, bool) or not isinstance(self.max_num_seqs, int) or self.max_num_seqs < 1:
            raise ExeGPTError(f"continuous batching: max_num_seqs={self.max_num_seqs!r} must be a whole number >= 1")
        if not isinstance(self.max_num_batched_tokens, int) or self.max_num_batched_tokens < 1:
            raise ExeGPTError(f"continuous batching: max_num_batched_tokens={self.max_num_batched_tokens!r} must be "
                              f"a whole number >= 1")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ExeGPTError(f"continuous batching: block_size={self.block_size!r} must be a whole number >= 1")
        check_tp(self.tp, self.tp_gpus, self.num_gpus, "continuous batching")
        if self.policy is not Policy.CB:
            raise ExeGPTError(f"CBSchedule has policy {self.policy!r}")

    @property
    def stages(self) -> tuple[int, ...]:
        return stage_degrees(self.num_gpus, self.tp, self.tp_gpus)


def layout(prob: Problem, s: CBSchedule) -> Layout | None:
    lay = rra.layout_of(prob, s.tp, s.tp_gpus)
    return None if lay is None else Layout(Policy.CB, lay.tp, lay.tp_gpus, lay.encode_gpus, lay.decode_gpus,
                                           lay.stages)


def kv_tokens(prob: Problem, lay: Layout, s: CBSchedule) -> float:
    """KV tokens one pipeline holds: on each stage's devices, what is left after weights and the activations of
    a full prefill step, over the KV bytes a token adds there; the smallest stage bounds the pipeline."""
    return pool_tokens(prob, lay.stages, s.max_num_batched_tokens / len(lay.stages))


def pool_tokens(prob: Problem, stages, step_tokens: float, reserved_tokens: float = 0.0) -> float:
    """KV tokens a pipeline of ``stages`` holds in a paged pool: on each stage's devices, what is left after
    weights, the activations of ``step_tokens`` and ``reserved_tokens`` of KV held elsewhere (hand-off buffers),
    over the KV bytes a token adds there; the smallest stage bounds the pipeline."""
    m, p, out = prob.model, len(stages), math.inf
    for i, st in enumerate(stages):
        w = stage_weights(m, st, i == 0, i == p - 1)
        per_token = m.kv_bytes_per_token(st.tp) * st.n_layers
        free = prob.capacity_bytes - w - float(activation_bytes(m, st.tp, step_tokens)) - per_token * reserved_tokens
        out = min(out, max(0.0, free) / per_token if per_token else math.inf)
    return out


def estimate_detail(prob: Problem, lay: Layout, s: CBSchedule) -> tuple[Terms, int]:
    """RRA's terms at N_D = 1 and B_E = S' / E[k], S' the running requests the KV pool and S allow."""
    longest = prob.workload.max_total_len
    if s.max_num_batched_tokens < longest:
        raise ExeGPTError(f"continuous batching: max_num_batched_tokens={s.max_num_batched_tokens} is below the "
                          f"workload's longest request ({longest} tokens), which could never be prefilled")
    if prob.model.max_seq_len % s.block_size:
        raise ExeGPTError(f"continuous batching: block_size={s.block_size} does not divide {prob.model.name}'s "
                          f"context of {prob.model.max_seq_len} tokens")
    pool = kv_tokens(prob, lay, s)
    mean_ctx = float(prob.stats.in_mean + (prob.mean_iters + 1) / 2)
    running = max(1.0, min(float(s.max_num_seqs), pool / max(mean_ctx, 1.0)))
    # About running / E[k] requests finish an iteration: a prefill of that many every iteration, or of one every
    # E[k] / running iterations when fewer than one finishes.
    k = max(prob.mean_iters, 1.0)
    be, nd = (running / k, 1) if running >= k else (1.0, max(1, min(prob.max_decode_iters, round(k / running))))
    memo = prob.memo.setdefault("cb_terms", {})  # schedules whose caps give the same running batch share it
    key = (prob.cluster.count, lay.stages, be, nd)
    if key not in memo:
        memo[key] = rra.box(prob, lay, be, be, nd, nd, detail=True)
    t = memo[key]
    ok = np.asarray(t.ok) & (pool // s.block_size >= -(-longest // s.block_size))  # the longest request fits
    return Terms(t.thr, t.lat, ok, t.t_enc, t.t_dec, t.bd, t.mem, t.refill, pool, dict(t.extra, encode_batch=be)), \
        prob.latency_len


def spaces(prob: Problem, policy, tps: list[int], space) -> list:
    """No box function: continuous batching is searched on the simulated engine (``candidates``)."""
    return []


def candidates(prob: Problem, tps: list[int], grid: int) -> list[CBSchedule]:
    """A grid of schedules to simulate: S geometric up to 256, T at the workload's longest request and 4x that,
    every TP layout of RRA's."""
    n, longest = prob.cluster.count, prob.workload.max_total_len
    seqs = sorted({int(x) for x in np.round(np.geomspace(1, 256, grid))})
    out = []
    for t in tps:
        for g in tp_gpu_counts(n, t):
            out += [CBSchedule(sq, tok, t, g, n) for sq in seqs for tok in (longest, 4 * longest)]
    return out


def parse(policy, fields: dict, num_gpus: int) -> CBSchedule:
    """A schedule from CLI fields (``max_num_seqs``, ``max_num_batched_tokens``, ``block_size``, ``tp``...)."""
    return CBSchedule(num_gpus=num_gpus, **with_tp_defaults(fields, num_gpus))


def describe(s: CBSchedule) -> str:
    return f"CB S={s.max_num_seqs} T={s.max_num_batched_tokens} B={s.block_size} TP{s.tp}x{s.tp_gpus}"


stage_roles = one_pipeline_roles


def from_fields(fields: dict) -> CBSchedule:
    return CBSchedule(**fields)


def cache_rows(plan, group: str) -> int:
    return plan.schedule.max_num_seqs


# --- driver -------------------------------------------------------------------------------------------

def pool_blocks(plan) -> int:
    """KV blocks of the pool a paged plan admits against (``Estimate.kv_tokens``; an unbounded pool: no limit)."""
    kv = plan.estimate.kv_tokens
    return int(kv // plan.schedule.block_size) if math.isfinite(kv) else 1 << 60


def context_blocks(view: View, size: int):
    """``blocks(rid, extra=0)``: the KV blocks of ``size`` tokens ``rid``'s context fills (at least its first
    token's), with ``extra`` more tokens."""

    def blocks(rid: int, extra: int = 0) -> int:
        return -(-(view.input_len(rid) + max(view.generated(rid), 1) + extra) // size)

    return blocks


def preempt_for_decode(running: list[int], preempted: deque, blocks, pool: int):
    """Before a decode iteration: while the running requests' next tokens need more blocks than the pool holds,
    preempt the newest (``Evict``; it goes first in ``preempted``, to be recomputed)."""
    while len(running) > 1 and sum(blocks(r, 1) for r in running) > pool:
        victim = running.pop()
        yield Evict((victim,))
        preempted.appendleft(victim)


def decode_running(view: View, running: list[int], preempted: deque, blocks, pool: int, dec: list):
    """One decode iteration of every running request, one micro-batch per stage, after preempting the newest while
    the pool lacks a block for a next token (``preempt_for_decode``); its (seconds, rows) go to ``dec``."""
    yield from preempt_for_decode(running, preempted, blocks, pool)
    t = view.now()
    steps = yield Decode(tuple(tuple(mb) for mb in split_even(running, view.num_stages)), 1)
    dec.append((view.now() - t, steps[0] if steps else 0))


def drivers(plan) -> dict:
    """The one driver of a continuous-batching plan, on the ``main`` group."""
    s = plan.schedule
    pool = pool_blocks(plan)

    def drive(view: View):
        p, size = view.num_stages, s.block_size
        blocks = context_blocks(view, size)

        running: list[int] = []  # in admission order: the newest is preempted first
        preempted: deque[int] = deque()
        enc: list[float] = []
        dec: list[tuple[float, int]] = []
        steady = SteadyMarker(enc, dec)
        while running or preempted or view.waiting() or view.more_to_come():
            running = yield from drop_finished(view, running)
            # Prefill step: preempted requests first, then new ones in arrival order, under S, T and the pool.
            free = pool - sum(blocks(r) for r in running)
            batch, tokens = [], 0
            queue = list(preempted) + view.waiting()
            for r in queue:
                need = view.input_len(r) + max(view.generated(r) - 1, 0)
                if len(running) + len(batch) >= s.max_num_seqs or tokens + need > s.max_num_batched_tokens \
                        or blocks(r) > free:
                    break
                batch.append(r)
                tokens += need
                free -= blocks(r)
            if len(batch) < len(queue) and len(running) + len(batch) >= s.max_num_seqs:
                steady.begin(view.now())  # the batch is full and the queue still feeds it
            elif len(batch) == len(queue) and batch:
                steady.end(view.now())  # the queue could not fill the step
            if batch:
                t = view.now()
                again = [r for r in batch if r in preempted]
                for r in again:
                    preempted.remove(r)
                if again:
                    yield Prefill(tuple(again), min(p, len(again)), resume=True)
                fresh = [r for r in batch if r not in again]
                if fresh:
                    yield Prefill(tuple(fresh), min(p, len(fresh)))
                enc.append(view.now() - t)
                running += batch
                continue
            active = [r for r in running if not view.done(r)]
            if not active:
                # This step's snapshot (``queue``): a request arriving since is taken by the next step.
                if not queue and view.more_to_come():
                    yield WaitArrival()
                elif queue:
                    r = queue[0]
                    raise ExeGPTError(f"continuous batching: request {r} needs {blocks(r)} KV blocks of {size} "
                                      f"tokens and the pool holds {pool}")
                continue
            yield from decode_running(view, running, preempted, blocks, pool, dec)
        return DriverStats(tuple(enc), tuple(dec), steady.window(view.now()))

    return {MAIN: drive}
