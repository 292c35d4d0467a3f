"""Shift Parallelism (Arctic Inference): each replica of P = SP x TP devices runs every step either in its base
configuration (Ulysses sequence parallelism over SP, TP within) or shifted to TP over all P devices, whichever
the step's size calls for, over one KV cache laid out alike in both modes (``runner.ulysses``).

Knobs: ``sp`` and ``tp`` (the base configuration; ``sp`` 1 is plain TP over P), ``threshold`` (a step of at least
this many tokens runs in the base mode, a smaller one shifted; Arctic's code defaults to 512, its docs say 256),
``replicas`` (independent copies of the replica, data parallelism; each request goes to one, round robin in
arrival order), and the step scheduler's ``token_budget``, ``max_num_seqs`` and ``block_size``: chunked prefill
(``exegpt.policies.chunked``), as Arctic runs on vLLM's. The four configurations the Shift Parallelism paper
compares are points of this one policy: TP (``sp`` 1, one replica), DP (``sp`` = ``tp`` = 1, P replicas), SP
(``threshold`` 1: every step in the base mode) and Shift.

Each device holds both weight shards (W / TP + W / P, Arctic's two models); the KV pool is what is left. Our
engines run a step's decodes and its prompt chunks as two forwards (as chunked prefill does here), so each
forward is switched on its own token count.

The estimate is chunked prefill's for one replica (continuous batching's steady cycle: a prefill of B_E prompts,
then decode iterations of the running rows), with the prefill, the decode iteration and the bound-length request's
iterations each priced in the mode its tokens select, and the throughput times the replicas. It is approximate (a
steady batch, not the step-by-step mix); the simulated engine prices every forward in its own mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ExeGPTError
from ..problem import Problem
from ..schedule import Policy
from ..stages import Layout, Stage, Terms, decode_times, encode_times
from ..memory import stage_weights
from . import cb, chunked

NAMES = (Policy.SHIFT,)

DEFAULT_THRESHOLD = 512
"""Arctic Inference's ``shift_parallel_threshold`` default in code (tokens per step)."""
THRESHOLDS = (1, 128, DEFAULT_THRESHOLD)
"""The thresholds the grid search tries: always SP, and two step sizes."""


@dataclass(frozen=True, slots=True)
class ShiftSchedule:
    """Shift Parallelism: ``replicas`` copies of an (``sp``, ``tp``) replica, a step of at least ``threshold``
    tokens in the base mode, chunked prefill of ``token_budget`` tokens a step and ``max_num_seqs`` requests."""

    token_budget: int
    max_num_seqs: int
    sp: int
    tp: int
    threshold: int
    """Step tokens at or over which a step runs in the base (SP) configuration."""
    replicas: int
    num_gpus: int
    block_size: int = 16
    policy: Policy = Policy.SHIFT

    def __post_init__(self):
        for name in ("sp", "tp", "replicas", "max_num_seqs", "block_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ExeGPTError(f"shift: {name}={v!r} must be a whole number >= 1")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int) or self.threshold < 1:
            raise ExeGPTError(f"shift: threshold={self.threshold!r} must be a whole number of step tokens >= 1 "
                              f"(steps of at least that many tokens run in the base SP configuration)")
        if not isinstance(self.token_budget, int) or self.token_budget <= self.max_num_seqs:
            raise ExeGPTError(f"shift: token_budget={self.token_budget!r} must exceed max_num_seqs="
                              f"{self.max_num_seqs}, or a step full of decodes leaves no token for a prompt chunk")
        if self.replicas * self.sp * self.tp != self.num_gpus:
            raise ExeGPTError(f"shift: replicas={self.replicas} x sp={self.sp} x tp={self.tp} must equal the "
                              f"{self.num_gpus} devices")

    @property
    def ranks(self) -> int:
        """Devices of one replica (P = SP x TP)."""
        return self.sp * self.tp

    @property
    def stages(self) -> tuple[int, ...]:
        return (self.ranks,)


def split_degrees(n_heads: int, n_kv_heads: int) -> list[int]:
    """Rank counts that can each hold whole GQA groups (the SP x TP products a model allows): 1 to the KV heads,
    evenly where they divide them, else the first ranks one group more (``exegpt.models.kv_shares``)."""
    return list(range(1, n_kv_heads + 1)) if n_kv_heads >= 1 and n_heads % n_kv_heads == 0 else []


def head_degrees(prob: Problem) -> list[int]:
    """Replica sizes P whose ranks can each hold whole GQA groups of the model's heads (``split_degrees``)."""
    return split_degrees(prob.model.n_heads, prob.model.n_kv_heads)


def check(prob: Problem, s: ShiftSchedule) -> None:
    """One line for a replica the model or profile cannot run: heads, encoder-decoder, missing tables."""
    m, p = prob.model, s.ranks
    if m.is_encoder_decoder:
        raise ExeGPTError(f"shift: Shift Parallelism runs decoder-only models, not {m.name}")
    if p not in head_degrees(prob):
        raise ExeGPTError(f"shift: sp={s.sp} x tp={s.tp} = {p} devices do not split {m.name}'s {m.n_heads} query "
                          f"and {m.n_kv_heads} KV heads into whole GQA groups; SP x TP must be one of "
                          f"{head_degrees(prob)}")
    for t in sorted({p, s.tp}):
        if (why := prob.tp_problem(t)) is not None:
            raise ExeGPTError(f"shift: {why}")
    if s.sp > 1 and not prob.cost.has_all_to_all(s.sp):
        raise ExeGPTError(f"shift: profile {prob.profile.id} has no all-to-all (nor all-reduce) table for a group "
                          f"of {s.sp} devices; sequence parallelism needs one (profile the collectives at that size)")


def layout(prob: Problem, s: ShiftSchedule) -> Layout | None:
    """One replica: a single whole-model stage of P devices with its SP degree (None: the weights do not fit)."""
    check(prob, s)
    stage = Stage("both", s.ranks, 0, prob.model.n_layers, sp=s.sp)
    if stage_weights(prob.model, stage, True, True) >= prob.capacity_bytes:
        return None
    return Layout(Policy.SHIFT, s.ranks, s.ranks, s.ranks, s.ranks, (stage,))


def estimate_detail(prob: Problem, lay: Layout, s: ShiftSchedule) -> tuple[Terms, int]:
    """Chunked prefill's terms for one replica, each phase in its mode, the throughput times the replicas (module
    docstring)."""
    sub = prob.with_devices(s.ranks)
    one = chunked.ChunkedSchedule(s.token_budget, s.max_num_seqs, s.ranks, s.ranks, s.ranks, s.block_size)
    t, latency_len = chunked.estimate_detail(sub, lay, one)
    thr, lat, ok, t_enc, t_dec = t.thr, t.lat, np.asarray(t.ok), t.t_enc, t.t_dec
    if s.sp > 1:  # TP-mode terms -> each in the mode its tokens select (one stage: the stage time is the phase's)
        be, rows_q, t_dec_q = t.extra["encode_batch"], t.extra["rows_q"], t.extra["t_dec_q"]
        iters = (be / thr - t_enc) / t_dec  # decode iterations a cycle runs
        phases = (lat - sub.k_q * t_dec_q) / t_enc  # prefills the bound-length request waits through
        t_enc, ok1 = _phase(sub, lay, encode_times, be, be * sub.stats.in_mean >= s.threshold)
        t_dec, ok2 = _phase(sub, lay, decode_times, t.bd, t.bd >= s.threshold)
        t_dec_q, ok3 = _phase(sub, lay, decode_times, rows_q, rows_q >= s.threshold)
        thr, lat, ok = be / (t_enc + iters * t_dec), phases * t_enc + sub.k_q * t_dec_q, ok & ok1 & ok2 & ok3
    return Terms(thr * s.replicas, lat, ok, t_enc, t_dec, t.bd, t.mem, t.refill, t.kv_tokens, t.extra), latency_len


def _phase(prob: Problem, lay: Layout, times, size, base) -> tuple[np.ndarray, np.ndarray]:
    """A one-stage phase of ``size`` prompts or rows in the base mode where ``base``, else TP."""
    tp_t, tp_ok = times(prob, lay.stages, size)
    sp_t, sp_ok = times(prob, lay.stages, size, base=True)
    return np.where(base, sp_t[0], tp_t[0]), np.where(base, sp_ok, tp_ok)


spaces = cb.spaces  # no box function: a grid of schedules (``candidates``)


def candidates(prob: Problem, tps: list[int], grid: int) -> list[ShiftSchedule]:
    """On two devices or more, every replica size P that splits the heads and the devices (the rest replicas): TP
    over P, and with P > 1 the base (P, 1) at ``THRESHOLDS``; S geometric from 4 to 256 (half the grid's points), a
    budget of S plus 8192 tokens or the longest prompt: whole prompts a step, as Arctic serves with a budget of
    131072 tokens (its artifact), so that a step's mode follows its requests, not its chunking."""
    n = prob.cluster.count
    seqs = sorted({int(x) for x in np.round(np.geomspace(4, 256, max(2, (grid + 1) // 2)))})
    budget = max(8192, prob.workload.input_len.max)  # whole prompts a step, as Arctic's large budget
    out = []
    if n == 1 or prob.model.is_encoder_decoder:
        return out  # one device: chunked prefill itself (``exegpt.policies.chunked``); T5: no Ulysses over it
    for p in head_degrees(prob):
        if n % p or p not in tps:
            continue
        grids = [(1, p, DEFAULT_THRESHOLD)] + ([(p, 1, t) for t in THRESHOLDS] if p > 1 else [])
        out += [ShiftSchedule(sq + budget, sq, sp, tp, thr, n // p, n) for sp, tp, thr in grids for sq in seqs]
    return out


def parse(policy, fields: dict, num_gpus: int) -> ShiftSchedule:
    """A schedule from CLI fields (``sp``, ``tp``, ``threshold``, ``replicas``, ``token_budget``,
    ``max_num_seqs``, ``block_size``); by default one replica of every device in the base (SP, 1), threshold 512,
    S = 64, T = 2048."""
    fields.setdefault("replicas", 1)
    fields.setdefault("tp", 1)
    fields.setdefault("sp", max(1, num_gpus // (fields["replicas"] * fields["tp"])))
    fields.setdefault("threshold", DEFAULT_THRESHOLD)
    fields.setdefault("max_num_seqs", 64)
    fields.setdefault("token_budget", 2048)
    return ShiftSchedule(num_gpus=num_gpus, **fields)


def describe(s: ShiftSchedule) -> str:
    """``shift SP4xTP2 >=512 T=2112 S=64``, ``TP8``, ``DP8`` (the replicas as ``DPxR`` otherwise)."""
    if s.sp == 1:
        head = f"TP{s.tp}" if s.tp > 1 or s.replicas == 1 else "DP"
    else:
        head = f"SP{s.sp}xTP{s.tp} " + ("always" if s.threshold == 1 else f">={s.threshold}")
    dp = "" if s.replicas == 1 else (f"{s.replicas}" if head == "DP" else f" DPx{s.replicas}")
    return f"shift {head}{dp} T={s.token_budget} S={s.max_num_seqs}"


def stage_roles(s: ShiftSchedule) -> tuple[tuple[str, int], ...]:
    return (("both", s.ranks),)


def from_fields(fields: dict) -> ShiftSchedule:
    return ShiftSchedule(**fields)


cache_rows = cb.cache_rows


def drivers(plan) -> dict:
    """Chunked prefill's driver, each forward in the base mode when its tokens reach the threshold. With
    replicas, each replica runs it on its own requests (the engines route them, ``exegpt.replicas``)."""
    s = plan.schedule
    return chunked.drivers(plan, sp_at=lambda tokens: s.sp > 1 and tokens >= s.threshold)
