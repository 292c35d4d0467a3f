"""Splitwiser: the prefill phase and the decode phase as two processes sharing one device and one copy of the
weights, each on its share of the device (threads of a CPU, an MPS active-thread percentage of a GPU), the KV of
every prefilled batch handed from the prefill process to the decode process, which merges it into its running
batch. The compute-bound and the memory-bound phase overlap instead of taking turns.

It is prefill/decode disaggregation (``disagg``) folded onto one device: the same two drivers (the prefill
process batches waiting prompts up to ``max_prefill_tokens`` and ``max_num_seqs``, at most ``HANDOFF_DEPTH``
batches ahead of the merges; the decode process is continuous batching over a paged KV pool, importing each
handed-off batch that fits), the same hand-off (``runner.handoff``). What differs is where they run: two
processes of one device, its memory holding the weights once (``runner.colocate`` maps one shared copy into both)
and both processes' KV; and what a step costs: each process computes on its share, slowed while the other
computes beside it.

Knobs: ``prefill_share`` and ``decode_share`` (percent of the device each process may use: on a CPU that share of
the cores as its threads, at least one; on a GPU ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``; shares summing past 100
overlap), ``max_num_seqs``, ``max_prefill_tokens`` and ``block_size`` as in ``disagg``. ``processes`` is 2: one
prefill and one decode process.

Pricing: the profile's kernel tables time one process alone with the whole device; ``Profile.phase_interference``
(``profiler.interference``) says per batch size how much slower each phase is on its share (``scale``) and how
much longer while the other phase computes (``kappa``). Without it, on a GPU of the datasheets the two factors
come from the roofline's account of sharing (``exegpt.share_roofline``: SMs split by share, one memory system);
elsewhere a phase is taken to run 100 / share times slower and the interference is the profile's two-rank
concurrency, or the oversubscription where the shares add past the device. Both are assumptions, not
measurements.

The estimate is approximate (the policy is searched on the simulated engine): the prefill process's throughput
at a batch of ``max_prefill_tokens / E[prompt]`` prompts and the decode process's at the running requests its caps
and KV pool allow, each slowed by the other's interference for the fraction of time the other is busy (a fixed
point), the lower of the two.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..devices import DEVICES
from ..errors import ExeGPTError
from ..memory import activation_bytes, stage_weights
from ..problem import Problem
from ..schedule import Policy
from ..share_roofline import share_factors, step_work
from ..stages import Layout, Terms, encode_times, pipeline_decode, place_stages
from . import disagg
from .base import DECODE, ENCODE
from .cb import pool_blocks, pool_tokens
from .waa import HANDOFF_DEPTH

NAMES = (Policy.SPLITWISER,)
PROCESSES = 2
"""A prefill process and a decode process."""
SHARES = ((50, 50), (100, 100), (25, 75), (75, 25))
"""Share splits the search tries (percent of the device: 1+1 and 2+2 threads on two cores, 25/75 and 75/25)."""


@dataclass(frozen=True, slots=True)
class SplitwiserSchedule:
    """Splitwiser: a prefill process and a decode process on one device."""

    max_num_seqs: int
    """S: requests the decode process runs at most (and a prefill batch holds at most)."""
    max_prefill_tokens: int
    """T: prompt tokens of one prefill batch at most; at least the workload's longest prompt."""
    prefill_share: int = 50
    """Percent of the device the prefill process may use (CPU: its threads; GPU: its MPS percentage)."""
    decode_share: int = 50
    block_size: int = 16
    """B: tokens per KV block of the decode process's pool."""
    processes: int = PROCESSES
    policy: Policy = Policy.SPLITWISER

    def __post_init__(self):
        if isinstance(self.processes, bool) or self.processes != PROCESSES:
            raise ExeGPTError(f"splitwiser: processes={self.processes!r}; it runs exactly {PROCESSES} processes on "
                              f"the device, a prefill and a decode process")
        for f in ("max_num_seqs", "max_prefill_tokens", "block_size"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ExeGPTError(f"splitwiser: {f}={v!r} must be a whole number >= 1")
        for f in ("prefill_share", "decode_share"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v <= 100:
                raise ExeGPTError(f"splitwiser: {f}={v!r} must be a percent of the device in 1..100 (more would "
                                  f"exceed the device)")
        if self.policy is not Policy.SPLITWISER:
            raise ExeGPTError(f"SplitwiserSchedule has policy {self.policy!r}")

    # One device, two one-rank groups on it.
    num_gpus = property(lambda self: 1)
    tp = property(lambda self: 1)
    tp_gpus = property(lambda self: 0)
    encode_gpus = property(lambda self: 1)
    decode_gpus = property(lambda self: 1)

    def share(self, group: str) -> int:
        return self.prefill_share if group == ENCODE else self.decode_share


def threads(share: int, cores: int) -> int:
    """A process's threads on ``cores`` cores for its ``share`` percent (at least one)."""
    return max(1, min(cores, round(share * cores / 100)))


def num_ranks(s: SplitwiserSchedule) -> int:
    """Processes the runner starts for the schedule's one device."""
    return s.processes


def layout(prob: Problem, s: SplitwiserSchedule) -> Layout | None:
    enc = place_stages(prob, (1,), "encode")
    dec = place_stages(prob, (1,), "decode")
    if enc is None or dec is None:
        return None
    return Layout(Policy.SPLITWISER, 1, 0, 1, 1, enc + dec)


def phase_pricing(prob: Problem, s: SplitwiserSchedule):
    """``price(group, rows) -> (scale, kappa)``: how much longer a step of ``rows`` of the group's phase takes on
    its share than the kernel tables say, and the fraction more it takes while the other process computes."""
    inter = prob.profile.phase_interference
    if inter is None and prob.cluster.device.name in DEVICES:  # a GPU of the datasheets: its roofline's account
        return _roofline_pricing(prob, s)
    if inter is None:  # shares past the whole device time-slice it
        kappa = max(prob.profile.concurrency(2) - 1.0, (s.prefill_share + s.decode_share) / 100.0 - 1.0)
        return lambda group, rows: (100.0 / s.share(group), kappa)
    kp, kd = threads(s.prefill_share, inter.cores), threads(s.decode_share, inter.cores)
    return lambda group, rows: inter.factors(kp, kd, "prefill" if group == ENCODE else "decode", rows)


def _roofline_pricing(prob: Problem, s: SplitwiserSchedule):
    """``exegpt.share_roofline`` against the other phase at its schedule's batch: the decode process at S
    requests, the prefill process at a full batch of mean prompts."""
    st, m, dev = prob.stats, prob.model, prob.cluster.device
    ctx = float(st.in_mean + prob.mean_iters / 2)
    bp = disagg.mean_prefill_batch(prob, s)
    others = {ENCODE: step_work(m, dev, "decode", s.max_num_seqs, st.in_mean, ctx),
              DECODE: step_work(m, dev, "prefill", bp, st.in_mean, ctx)}
    mine = {ENCODE: s.prefill_share / 100, DECODE: s.decode_share / 100}

    def price(group, rows):
        me = step_work(m, dev, "prefill" if group == ENCODE else "decode", max(float(rows), 1.0), st.in_mean, ctx)
        other = DECODE if group == ENCODE else ENCODE
        return share_factors(me, mine[group], others[group], mine[other])
    return price


def estimate_detail(prob: Problem, lay: Layout, s: SplitwiserSchedule) -> tuple[Terms, int]:
    """Each process's throughput on its share, slowed by the other's interference while it is busy."""
    disagg.check_knobs(prob, s, "splitwiser")  # the same two knobs as disaggregation's
    enc_st, dec_st, st = lay.group("encode"), lay.group("decode"), prob.stats
    price = phase_pricing(prob, s)
    bp = disagg.mean_prefill_batch(prob, s)
    enc, ok_e = encode_times(prob, enc_st, bp)
    in_flight = HANDOFF_DEPTH * s.max_prefill_tokens  # hand-off receive buffers, and the batch being prefilled
    pool = pool_tokens(prob, dec_st, s.max_num_seqs, in_flight + s.max_prefill_tokens)
    mean_ctx = float(st.in_mean + (prob.mean_iters + 1) / 2)
    running = max(1.0, min(float(s.max_num_seqs), pool / max(mean_ctx, 1.0)) - (bp - 1) / 2)
    k = max(prob.mean_iters, 1.0)
    t_dec, ok_d, _ = pipeline_decode(prob, dec_st, running)
    hand, ok_h = prob.cost.kv_handoff(bp)
    if prob.profile.handoff_on_compute:  # the decode process imports running / k requests an iteration
        t_dec = t_dec + hand * (running / k) / bp
    sp, kp = price(ENCODE, bp)
    sd, kd = price(DECODE, running)
    t_enc, t_dec = enc[0] * sp, t_dec * sd
    busy_p = busy_d = 1.0
    for _ in range(8):  # each slowed while the other computes; the faster one idles part of the time
        te, td = t_enc * (1 + kp * busy_d), t_dec * (1 + kd * busy_p)
        thr = np.minimum(bp / te, running / (k * td))
        busy_p, busy_d = np.minimum(1.0, thr * te / bp), np.minimum(1.0, thr * k * td / running)
    # At most HANDOFF_DEPTH batches ahead of the merges, a merge at a decode iteration's end.
    te = np.maximum(te, (te + hand + td) / HANDOFF_DEPTH)
    thr = np.minimum(bp / te, running / (k * td))
    lat = te + hand + prob.k_q * td
    m = prob.model
    weights = stage_weights(m, dec_st[0], True, True)  # once: both processes map one copy
    kv_token = m.kv_bytes_per_token(1) * m.n_layers
    # The peak the schedule needs: both processes' activations, S rows of the longest request's KV, the batches
    # in flight; the paged pool takes what is left (``kv_tokens``).
    mem = [weights + activation_bytes(m, 1, s.max_prefill_tokens + s.max_num_seqs) +
           kv_token * (s.max_num_seqs * prob.workload.max_total_len + in_flight + s.max_prefill_tokens)]
    pool = pool_tokens(prob, dec_st, s.max_prefill_tokens + s.max_num_seqs, in_flight + s.max_prefill_tokens)
    blocks = pool // s.block_size
    batch_blocks = -(-s.max_prefill_tokens // s.block_size) + s.max_num_seqs
    ok = np.asarray(ok_e & ok_h & ok_d) & (mem[0] <= prob.capacity_bytes) & (blocks >= batch_blocks) & \
        (blocks >= -(-prob.workload.max_total_len // s.block_size)) & (weights < prob.capacity_bytes)
    return Terms(thr, lat, ok, te, td, running, mem, None, pool, dict(prefill_batch=bp)), prob.latency_len


def spaces(prob: Problem, policy, tps: list[int], space) -> list:
    """No box function: Splitwiser is searched on the simulated engine (``candidates``)."""
    return []


def candidates(prob: Problem, tps: list[int], grid: int) -> list[SplitwiserSchedule]:
    """A grid to simulate, on one device only: every share split of ``SHARES``, S geometric up to 256, T at the
    workload's longest prompt and 4x that. Each process holds the whole model (TP 1)."""
    if prob.cluster.count != 1 or 1 not in tps:
        return []
    longest = prob.workload.input_len.max
    seqs = sorted({int(x) for x in np.round(np.geomspace(1, 256, grid))})
    return [SplitwiserSchedule(sq, tok, p, d) for p, d in SHARES for sq in seqs for tok in (longest, 4 * longest)]


def parse(policy, fields: dict, num_gpus: int) -> SplitwiserSchedule:
    """A schedule from CLI fields (``max_num_seqs``, ``max_prefill_tokens``, ``prefill_share``, ``decode_share``,
    ``block_size``); Splitwiser runs on one device."""
    if num_gpus != 1:
        raise ExeGPTError(f"splitwiser runs on one device; {num_gpus} were given")
    return SplitwiserSchedule(**fields)


def describe(s: SplitwiserSchedule) -> str:
    return (f"splitwiser S={s.max_num_seqs} T={s.max_prefill_tokens} B={s.block_size} "
            f"P{s.prefill_share}%+D{s.decode_share}%")


def stage_roles(s: SplitwiserSchedule) -> tuple[tuple[str, int], ...]:
    return (("encode", 1), ("decode", 1))


def from_fields(fields: dict) -> SplitwiserSchedule:
    return SplitwiserSchedule(**fields)


prefill_rows = disagg.prefill_rows
cache_rows = disagg.cache_rows


def drivers(plan) -> dict:
    """Disaggregation's two drivers: the prefill process's (``encode`` group) and the decode process's."""
    s = plan.schedule
    need = -(-s.max_prefill_tokens // s.block_size) + prefill_rows(plan)  # a full batch's prompts and first tokens
    if need > pool_blocks(plan):
        raise ExeGPTError(f"splitwiser: a KV hand-off of up to {s.max_prefill_tokens} prompt tokens "
                          f"(max_prefill_tokens) needs {need} blocks of {s.block_size} tokens; the decode process's "
                          f"cache holds {pool_blocks(plan)}")
    return disagg.drivers(plan)


SHARES_WEIGHTS = True
"""The runner maps one copy of the weights into both processes (``runner.colocate``)."""
