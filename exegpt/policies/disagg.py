"""Prefill/decode disaggregation (DistServe, Splitwise): a prefill pool and a decode pool of devices, each with its
own parallelism, the KV of every prefilled batch moved from the one to the other.

Knobs: the pool split (``prefill_gpus`` + ``decode_gpus``), each pool's TP degree (``prefill_tp``,
``decode_tp``; a pool of G devices at degree t is a pipeline of G / t stages, DistServe's intra- and inter-op
parallelism per instance), the prefill batch's tokens (``max_prefill_tokens``), the decode pool's running
requests (``max_num_seqs``) and its KV block size (``block_size``).

The prefill driver batches waiting requests in arrival order up to ``max_prefill_tokens`` prompt tokens (and the
decode pool's ``max_num_seqs`` requests), prefills the batch on the prefill pool and hands its KV to the decode
pool, at most ``HANDOFF_DEPTH`` batches ahead of the decode pool's merges (``waa.encoder``). Unlike WAA, the two
pools do not run in lockstep: the decode driver is continuous batching. Each step it imports every handed-off
batch that is already there and fits its running cap and its free KV blocks (it waits for one only when it has
nothing to decode), then runs one decode iteration of every running request in one micro-batch per stage. KV is
accounted in blocks against the decode pool's memory (``Estimate.kv_tokens``), as a paged cache does; when the
pool is short, the newest running request is preempted and later recomputed on the decode pool (vLLM's recompute
preemption, ``cb``).

The estimate is approximate (the policy is searched on the simulated engine): the prefill pool's throughput at a
batch of ``max_prefill_tokens / E[prompt]`` prompts, the decode pool's at the running requests its caps and KV
pool allow, the lower of the two; the latency is a batch's prefill, its hand-off and the bound-length output's
decode iterations.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from ..errors import ExeGPTError
from ..problem import Problem
from ..rules import SteadyMarker
from ..schedule import Policy
from ..stages import Layout, Terms, concurrent_times, encode_times, fits, pipeline_decode, place_stages, \
    spans_ranks, stage_memory
from .base import DECODE, ENCODE, DriverStats, Merge, Peek, Prefill, View, drop_finished
from .cb import context_blocks, decode_running, pool_blocks, pool_tokens
from .waa import HANDOFF_DEPTH, encoder

NAMES = (Policy.DISAGG,)


@dataclass(frozen=True, slots=True)
class DisaggSchedule:
    """Prefill/decode disaggregation: a prefill pool and a decode pool, each a pipeline of TP groups."""

    max_num_seqs: int
    """S: requests the decode pool runs at most (and a prefill batch holds at most)."""
    max_prefill_tokens: int
    """T: prompt tokens of one prefill batch at most; at least the workload's longest prompt."""
    prefill_gpus: int
    decode_gpus: int
    prefill_tp: int = 1
    """TP degree of the prefill pool's stages (``prefill_gpus / prefill_tp`` pipeline stages)."""
    decode_tp: int = 1
    block_size: int = 16
    """B: tokens per KV block of the decode pool."""
    policy: Policy = Policy.DISAGG

    def __post_init__(self):
        for f in ("max_num_seqs", "max_prefill_tokens", "block_size", "prefill_tp", "decode_tp"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ExeGPTError(f"disaggregation: {f}={v!r} must be a whole number >= 1")
        for pool in ("prefill", "decode"):
            g, t = getattr(self, f"{pool}_gpus"), getattr(self, f"{pool}_tp")
            if isinstance(g, bool) or not isinstance(g, (int, np.integer)) or g < 1:
                raise ExeGPTError(f"disaggregation: {pool}_gpus={g!r} leaves the {pool} pool empty; each pool "
                                  f"needs >= 1 device")
            if g % t:
                raise ExeGPTError(f"disaggregation: {pool}_tp={t} does not divide the {pool} pool's {g} devices")
        if self.policy is not Policy.DISAGG:
            raise ExeGPTError(f"DisaggSchedule has policy {self.policy!r}")

    @property
    def num_gpus(self) -> int:
        return self.prefill_gpus + self.decode_gpus

    @property
    def encode_gpus(self) -> int:
        return self.prefill_gpus

    @property
    def tp(self) -> int:
        return max(self.prefill_tp, self.decode_tp)

    @property
    def tp_gpus(self) -> int:
        """Devices in a pool whose TP degree is above 1."""
        return (self.prefill_gpus if self.prefill_tp > 1 else 0) + (self.decode_gpus if self.decode_tp > 1 else 0)

    @property
    def encode_stages(self) -> tuple[int, ...]:
        return (self.prefill_tp,) * (self.prefill_gpus // self.prefill_tp)

    @property
    def decode_stages(self) -> tuple[int, ...]:
        return (self.decode_tp,) * (self.decode_gpus // self.decode_tp)


def layout(prob: Problem, s: DisaggSchedule) -> Layout | None:
    enc = place_stages(prob, s.encode_stages, "encode")
    dec = place_stages(prob, s.decode_stages, "decode")
    if enc is None or dec is None:
        return None
    return Layout(Policy.DISAGG, s.tp, s.tp_gpus, s.prefill_gpus, s.decode_gpus, enc + dec)


def check_knobs(prob: Problem, s, label: str = "disaggregation") -> None:
    """One clear line for knobs the workload or the model cannot run with (``s``: a schedule with
    ``max_prefill_tokens`` and ``block_size``; ``label`` names its policy in the line)."""
    longest = prob.workload.input_len.max
    if s.max_prefill_tokens < longest:
        raise ExeGPTError(f"{label}: max_prefill_tokens={s.max_prefill_tokens} is below the workload's "
                          f"longest prompt ({longest} tokens), which could never be prefilled")
    if prob.model.max_seq_len % s.block_size:
        raise ExeGPTError(f"{label}: block_size={s.block_size} does not divide {prob.model.name}'s "
                          f"context of {prob.model.max_seq_len} tokens")


def mean_prefill_batch(prob: Problem, s) -> float:
    """Prompts a prefill batch holds on average: ``max_prefill_tokens`` of mean prompts, 1 to ``max_num_seqs``."""
    return float(np.clip(s.max_prefill_tokens / max(prob.stats.in_mean, 1.0), 1.0, s.max_num_seqs))


def estimate_detail(prob: Problem, lay: Layout, s: DisaggSchedule) -> tuple[Terms, int]:
    """The lower of the prefill pool's and the decode pool's throughput; a batch's prefill, hand-off and the
    bound-length output's decode iterations."""
    check_knobs(prob, s)
    enc_st, dec_st, st = lay.group("encode"), lay.group("decode"), prob.stats
    bp = mean_prefill_batch(prob, s)
    enc, ok_e = encode_times(prob, enc_st, bp)
    t_int, t_lat = np.maximum.reduce(enc), sum(enc)
    if len(enc_st) > 1:
        t_lat = t_lat + prob.cost.token_return(bp)[0]
    hand, ok_h = prob.cost.kv_handoff(bp)
    in_flight = HANDOFF_DEPTH * s.max_prefill_tokens  # the decode ranks' posted hand-off receives
    pool = pool_tokens(prob, dec_st, s.max_num_seqs / len(dec_st), in_flight)
    mean_ctx = float(st.in_mean + (prob.mean_iters + 1) / 2)
    # A handed-off batch is imported whole, so rows freed wait for a batch to fit: half a batch empty on average.
    running = max(1.0, min(float(s.max_num_seqs), pool / max(mean_ctx, 1.0)) - (bp - 1) / 2)
    k = max(prob.mean_iters, 1.0)
    t_dec, ok_d, _ = pipeline_decode(prob, dec_st, running)
    if prob.profile.handoff_on_compute:  # the decode driver imports running / k requests an iteration
        t_dec = t_dec + hand * (running / k) / bp
    t_enc_alone = t_int
    t_int, t_dec = concurrent_times(prob.concurrency, t_int, t_dec, not spans_ranks(enc_st), not spans_ranks(dec_st))
    t_lat = t_lat + (t_int - t_enc_alone)
    # The prefill pool runs at most HANDOFF_DEPTH batches ahead of the merges, and a batch merges at a decode
    # iteration's end: that many batches per prefill latency, hand-off and decode iteration.
    t_int = np.maximum(t_int, (t_lat + hand + t_dec) / HANDOFF_DEPTH)
    thr = np.minimum(bp / t_int, running / (k * t_dec))
    lat = t_lat + hand + prob.k_q * t_dec
    mem = stage_memory(prob, enc_st, 0, s.max_prefill_tokens, kv_rows_in_flight=(HANDOFF_DEPTH + 1) * bp) + \
        stage_memory(prob, dec_st, 0, s.max_num_seqs / len(dec_st), recv_rows=HANDOFF_DEPTH * bp)
    blocks = pool // s.block_size
    batch_blocks = -(-s.max_prefill_tokens // s.block_size) + s.max_num_seqs  # a full batch and its first tokens
    ok = np.asarray(ok_e & ok_h & ok_d & fits(prob, mem)) & (blocks >= batch_blocks) & \
        (blocks >= -(-prob.workload.max_total_len // s.block_size))
    return Terms(thr, lat, ok, t_int, t_dec, running, mem, None, pool, dict(prefill_batch=bp)), prob.latency_len


def spaces(prob: Problem, policy, tps: list[int], space) -> list:
    """No box function: disaggregation is searched on the simulated engine (``candidates``)."""
    return []


def candidates(prob: Problem, tps: list[int], grid: int) -> list[DisaggSchedule]:
    """A grid of schedules to simulate (DistServe's placement search): every pool split, every TP degree of each
    pool that divides it, S geometric up to 256, T at the workload's longest prompt and 4x that."""
    n, longest = prob.cluster.count, prob.workload.input_len.max
    seqs = sorted({int(x) for x in np.round(np.geomspace(1, 256, grid))})
    out = []
    for pg in range(1, n):
        for pt in (t for t in tps if pg % t == 0):
            for dt in (t for t in tps if (n - pg) % t == 0):
                out += [DisaggSchedule(sq, tok, pg, n - pg, pt, dt) for sq in seqs for tok in (longest, 4 * longest)]
    return out


def parse(policy, fields: dict, num_gpus: int) -> DisaggSchedule:
    """A schedule from CLI fields (``max_num_seqs``, ``max_prefill_tokens``, ``prefill_gpus``, ``prefill_tp``,
    ``decode_tp``, ``block_size``); the decode pool takes the devices the prefill pool leaves."""
    fields.setdefault("prefill_gpus", max(1, num_gpus // 2))
    fields.setdefault("decode_gpus", num_gpus - fields["prefill_gpus"])
    return DisaggSchedule(**fields)


def describe(s: DisaggSchedule) -> str:
    return (f"disagg S={s.max_num_seqs} T={s.max_prefill_tokens} B={s.block_size} "
            f"P{s.prefill_gpus}/TP{s.prefill_tp}+D{s.decode_gpus}/TP{s.decode_tp}")


def stage_roles(s: DisaggSchedule) -> tuple[tuple[str, int], ...]:
    return tuple(("encode", t) for t in s.encode_stages) + tuple(("decode", t) for t in s.decode_stages)


def from_fields(fields: dict) -> DisaggSchedule:
    return DisaggSchedule(**fields)


def prefill_rows(plan) -> int:
    """Requests one prefill batch holds at most: ``max_num_seqs``, and no more than ``max_prefill_tokens`` of
    the workload's shortest prompts."""
    s = plan.schedule
    return max(1, min(s.max_num_seqs, s.max_prefill_tokens // max(1, plan.workload.input_len.min)))


def cache_rows(plan, group: str) -> int:
    return plan.schedule.max_num_seqs if group == DECODE else prefill_rows(plan)


# --- drivers ------------------------------------------------------------------------------------------

def drivers(plan) -> dict:
    """The prefill pool's driver (``encode`` group) and the decode pool's (``decode`` group)."""
    s = plan.schedule
    rows, pool = prefill_rows(plan), pool_blocks(plan)

    def take(view: View, waiting: list[int]) -> tuple[int, ...]:
        batch, tokens = [], 0
        for r in waiting:
            n = view.input_len(r)
            if batch and (tokens + n > s.max_prefill_tokens or len(batch) >= rows):
                break
            batch.append(r)
            tokens += n
        return tuple(batch)

    def decode(view: View):
        p, size = view.num_stages, s.block_size
        blocks = context_blocks(view, size)

        running: list[int] = []  # in admission order: the newest is preempted first
        preempted: deque[int] = deque()
        enc: list[float] = []
        dec: list[tuple[float, int]] = []
        steady = SteadyMarker(enc, dec)
        ended = False
        while True:
            running = yield from drop_finished(view, running)
            free = pool - sum(blocks(r) for r in running)
            if preempted:  # recompute preempted requests first, as their blocks free up
                again = []
                for r in preempted:
                    if len(running) + len(again) >= s.max_num_seqs or blocks(r) > free:
                        break
                    again.append(r)
                    free -= blocks(r)
                if again:
                    for r in again:
                        preempted.remove(r)
                    yield Prefill(tuple(again), min(p, len(again)), resume=True)
                    running += again
                    continue
            elif not ended and len(running) < s.max_num_seqs:
                # Import the next handed-off batch if it is here (wait for it with nothing to decode) and fits.
                rids = yield Peek(wait=not running)
                if rids is None:
                    ended = True
                    steady.end(view.now())
                elif rids and len(running) + len(rids) <= s.max_num_seqs and \
                        sum(blocks(r) for r in rids) <= free:
                    m = yield Merge()
                    running += m.rids
                    enc.append(m.encode_s)
                    continue
                elif rids and not running:
                    raise ExeGPTError(f"disaggregation: a prefill batch of {len(rids)} requests needs "
                                      f"{sum(blocks(r) for r in rids)} KV blocks of {size} tokens and the decode "
                                      f"pool holds {pool}")
            if not running:
                if ended and not preempted:
                    break
                continue
            if len(running) >= plan.estimate.decode_batch:
                steady.begin(view.now())
            yield from decode_running(view, running, preempted, blocks, pool, dec)
        return DriverStats(tuple(enc), tuple(dec), steady.window(view.now()))

    return {ENCODE: encoder(take), DECODE: decode}
