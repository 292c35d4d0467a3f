"""The ExeGPT simulator: steady-state throughput and bound-length latency of RRA, WAA-C/M and static.

Every policy is written as a **box function**: given arrays of lower and upper corners of boxes of
its two search variables, it returns an upper bound on throughput, a lower bound on latency and
whether any point of the box can fit (memory, profiled range). A single point is the box whose two
corners coincide, and then the numbers are exact estimates. The bounds are sound because every
cost is non-decreasing in the batch it is given (the profile's monotone envelope) and bounded below
by a cost whose per-row time never grows with batch size (the batching envelope), so the branch and
bound in ``search.py`` returns the exact optimum. Arrays
broadcast, so the exhaustive reference evaluates a whole grid in one call.

Every stage time t_s is its layers (each with its TP all-reduces), the hop of its output to the next stage,
and, for a pipeline's first stage with TP > 1, the hop of each command from the driver to the stage's other
ranks, which cannot start before it arrives (``CostModel.tp_command``; measured as one loaded hop on a CPU).

RRA (paper §4.1, §6; "our reading" where marked):
  * all N devices form P pipeline stages (partial TP: ``tp_gpus / tp`` TP stages, then single
    devices); each phase is split into one micro-batch per stage (method doc §11.1);
  * encode phase: T_E = sum_s t_s(B_E/P) + (P-1) max_s t_s(B_E/P) + token hop (fill, drain, first tokens
    back to the driver);
  * decode iteration: T_D = max(P * max_s t_s(B_D/P), sum_s t_s(B_D/P) + token hop) (every stage runs
    each of P micro-batches, and a micro-batch's next iteration waits for its tokens to come back to the
    driver: with P micro-batches in flight the round trip is on the critical path);
  * completions per phase: a query with k decode iterations finishes in exactly one of its
    ceil(k/N_D) phases (P_D(U|S)), and B_E = B_D sum_U P_D(U). The paper sums P_D(U|S) over the
    arrival distribution P_D(S); the decode batch, however, holds each query for ceil(k/N_D) phases,
    so its mix is length-biased, P_batch(S) ~ P_D(S) ceil(k/N_D) (our reading; measured: the
    unweighted sum over-predicts completions by ~20 % on the CPU runner). With that mix
    sum_U P_D(U) = 1 / E[ceil(k/N_D)]: the batch refilled at a phase start is B_E E[ceil(k/N_D)]
    (Little's law), and the mean rows of a decode iteration are B_E E[k] / N_D (each query is
    computed for k iterations) when every phase runs N_D iterations;
  * a phase ends early when its whole batch has finished (the runner starts the next encode phase then): it runs
    I = E[min(N_D, longest remaining)] <= N_D iterations (``exegpt.phases``; our reading of the runner, the
    paper counts N_D), of B_E E[k] / I rows on average;
  * throughput = B_E / (T_E + I T_D); latency(L) = max(1, ceil(k_L/N_D)) T_E + k_L T_D(R_L), where R_L are the
    rows the query decodes beside: a long query lives through the first iterations of its phases, when the
    batch is fullest (``exegpt.phases.QueryRows``; our reading of the runner).
WAA (paper §4.2, §6):
  * encode group (E devices) and decode group (D devices) run concurrently; one encode batch enters
    per decode iteration; B_D = B_E E[k] (Little's law; the paper's B_E * S_D);
  * encode interval = slowest encode stage; encode latency = sum of encode stages;
    KV hand-off of each batch through host memory (profiled ``kv_handoff``);
  * decode iteration with M = ceil(B_D/B_m) micro-batches of B_D/M rows over the decode stages:
    T_D = max(sum_s t_s (+ the token hop back to the decode driver with several stages), M max_s t_s);
    period T = max(T_D, encode interval, hand-off), or max(T_D + hand-off, encode interval) when the profile
    says the hand-off runs on the ranks' own compute (``Profile.handoff_on_compute``: a CPU, where the decode
    driver receives and imports each batch between its decode iterations), times the profile's measured
    lockstep of the two groups (``Profile.waa_period_factor``, 1 unless measured);
  * throughput = B_E / T; latency(L) = max(encode latency + hand-off, HANDOFF_DEPTH T) + T_D + (k_L - 1) T:
    the paper's "buffer time" before a batch merges is one period; the built-in runner's encoder runs up to
    HANDOFF_DEPTH batches ahead of the merges, so when the decoder is the bottleneck a batch waits that many
    periods from its encode start (measured on the simulated engine, ``exegpt.sim``, which runs the
    runner's drivers), and when the encoder is, its encode latency and hand-off. Then its first iteration
    right after the merge, every later one a period on.
Static (FasterTransformer, the paper's baseline): a batch of B runs E[max k] decode iterations with
no early termination; its bound applies to the longest output (paper §7.1).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import numpy as np

from .bound import LatencyBound
from .cost import CostModel, WorkloadStats
from .devices import Cluster
from .errors import ExeGPTError
from .memory import MEMORY_FRACTION, activation_bytes, kv_bytes, stage_weight_bytes
from .models import ModelShape
from .phases import PhaseLengths, QueryRows, phases_per_query
from .placement import place_layers
from .policies.waa import HANDOFF_DEPTH
from .plan import Estimate, Stage
from .profile import Kernel, Profile
from .schedule import Policy, RRASchedule, Schedule, WAASchedule, stage_degrees
from .workload import Workload

_REF_ROWS = 8.0  # rows at which per-layer times are compared to balance the layer placement


@dataclass(frozen=True, eq=False)
class Problem:
    """Everything fixed while schedules vary: profile, model, devices, workload and the bound."""

    profile: Profile
    model: ModelShape
    cluster: Cluster
    workload: Workload
    bound: LatencyBound
    cost: CostModel
    bound_cost: CostModel
    """The same costs on the profile's batching envelope: used only inside box bounds."""
    capacity_bytes: float
    latency_len: int
    """The output length the bound applies to (its length quantile)."""
    k_q: int
    """Decode iterations of a ``latency_len`` output."""
    phases: np.ndarray
    """phases[n] = E[ceil(k / n)]: decode phases a query spends in the batch at N_D = n (index 0 unused)."""
    mean_iters: float
    """E[k]: decode iterations per query."""
    phase_iters: PhaseLengths
    """phase_iters(B_E, N_D): decode iterations an RRA phase runs on average (at most N_D; ``exegpt.phases``)."""
    @classmethod
    def build(cls, workload: Workload, bound: LatencyBound, profile: Profile, model: ModelShape,
              cluster: Cluster, memory_fraction: float = MEMORY_FRACTION) -> Problem:
        if not 0 < memory_fraction <= 1:
            raise ExeGPTError(f"memory_fraction {memory_fraction!r} must be in (0, 1]")
        if profile.kv_dtype is not None and profile.kv_dtype != (model.kv_dtype or model.dtype):
            model = dataclasses.replace(model, kv_dtype=profile.kv_dtype)  # the backend's cache, as profiled
        copies = {"packed_dtype": profile.packed_weight_dtype or "", "panel_dtype": profile.panel_weight_dtype or ""}
        if any(getattr(model, f) != d for f, d in copies.items()):
            model = dataclasses.replace(model, **copies)  # and its weights' extra copies
        if workload.max_total_len > model.max_seq_len:
            raise ExeGPTError(f"workload reaches {workload.max_total_len} tokens (prompt + output) but "
                              f"{model.name} supports {model.max_seq_len}")
        if model.is_encoder_decoder and not profile.has(Kernel.ATTN_CROSS):
            raise ExeGPTError(f"profile {profile.id} has no attn_cross table, which encoder-decoder "
                              f"model {model.name} needs")
        stats = WorkloadStats.of(workload, first_token_in_encode=not model.is_encoder_decoder)
        shift = 1 if not model.is_encoder_decoder else 0
        latency_len = workload.output_len.quantile(bound.length_quantile)
        k, p = stats.k_lengths, stats.k_probs
        phases = phases_per_query(k, p)
        memory = cluster.device.memory_bytes if profile.device_memory_bytes is None \
            else profile.device_memory_bytes
        return cls(profile, model, cluster, workload, bound, CostModel(profile, model, stats),
                   CostModel(profile, model, stats, per_unit=True), memory * memory_fraction,
                   latency_len, latency_len - shift, phases,
                   float(np.dot(k, p)), PhaseLengths(k, p, phases))

    def with_devices(self, count: int) -> Problem:
        """The same problem on ``count`` of the cluster's devices."""
        return dataclasses.replace(self, cluster=Cluster(self.cluster.device, count))

    # Every plan of a problem runs on all its cluster's devices: the factors measured at that many ranks.
    @functools.cached_property
    def slowdown(self) -> float:
        """``Profile.slowdown`` at the cluster's device count: the computed terms of a group of stages that spans
        several ranks (``_group_cost``)."""
        return self.profile.slowdown(self.cluster.count)

    @functools.cached_property
    def concurrency(self) -> float:
        """``Profile.concurrency`` at the cluster's device count: a one-rank WAA group computing while the other
        group computes too (``concurrent_times``)."""
        return self.profile.concurrency(self.cluster.count)

    @property
    def stats(self) -> WorkloadStats:
        return self.cost.stats

    @functools.cached_property
    def query_rows(self) -> QueryRows:
        """The rows the bound-length query decodes beside in RRA, per N_D (``exegpt.phases``; built on first use)."""
        return QueryRows(self.stats.k_lengths, self.stats.k_probs, self.phases, self.k_q)

    @property
    def max_decode_iters(self) -> int:
        return len(self.phases) - 1

    def max_batch(self, kernel: Kernel) -> float:
        return self.profile.max_coord(kernel, 1, 0)


@dataclass(frozen=True, eq=False)
class Layout:
    """A fixed device layout: the policy, TP configuration, GPU split and layer placement."""

    policy: Policy
    tp: int
    tp_gpus: int
    encode_gpus: int
    decode_gpus: int
    stages: tuple[Stage, ...]

    def group(self, role: str) -> tuple[Stage, ...]:
        return tuple(s for s in self.stages if s.role in (role, "both"))


def _place(prob: Problem, degrees: tuple[int, ...], role: str, n_layers: int, encoder: bool) -> tuple[int, ...] | None:
    """Layers per stage for one group of stages, balanced on per-layer time (CP-SAT, cached)."""
    cost, model = prob.cost, prob.model
    tps = sorted(set(degrees))
    if not all(prob.profile.supports_tp(t) for t in tps):
        return None
    if role == "encode":
        per = {t: float(cost.encode_layer(t, 1.0)[0]) for t in tps}
    else:
        per = {t: float(cost.decode_layer(t, _REF_ROWS)[0]) for t in tps}
    head = float(prob.profile.seconds(Kernel.LM_HEAD, 1, _REF_ROWS))
    last = len(degrees) - 1
    fixed_s = [head if (s == last and not encoder) else 0.0 for s in range(len(degrees))]
    per_bytes = [model.encoder_layer_bytes(t) if encoder else model.layer_bytes(t) for t in degrees]
    fixed_bytes = [stage_weight_bytes(model, t, 0, 0, s == 0, s == last) for s, t in enumerate(degrees)]
    return place_layers(n_layers, [per[t] for t in degrees], fixed_s, per_bytes, fixed_bytes, prob.capacity_bytes)


def _stages(prob: Problem, degrees: tuple[int, ...], role: str) -> tuple[Stage, ...] | None:
    model = prob.model
    if model.is_encoder_decoder and role in ("encode", "decode"):
        # T5 under WAA: the encode group holds the encoder, the decode group the decoder.
        n = model.n_encoder_layers if role == "encode" else model.n_layers
        counts = _place(prob, degrees, role, n, encoder=role == "encode")
        if counts is None:
            return None
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        if role == "encode":
            return tuple(Stage(role, t, 0, 0, int(a), c) for t, a, c in zip(degrees, starts, counts))
        return tuple(Stage(role, t, int(a), c) for t, a, c in zip(degrees, starts, counts))
    counts = _place(prob, degrees, role, model.n_layers, encoder=False)
    if counts is None:
        return None
    enc = (0,) * len(degrees)
    if model.is_encoder_decoder:
        enc = _place(prob, degrees, "encode", model.n_encoder_layers, encoder=True)
        if enc is None:
            return None
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    enc_starts = np.concatenate([[0], np.cumsum(enc)[:-1]])
    return tuple(Stage(role, t, int(a), c, int(ea), e)
                 for t, a, c, ea, e in zip(degrees, starts, counts, enc_starts, enc))


def rra_layout(prob: Problem, tp: int, tp_gpus: int) -> Layout | None:
    n = prob.cluster.count
    stages = _stages(prob, stage_degrees(n, tp, tp_gpus), "both")
    return None if stages is None else Layout(Policy.RRA, tp, tp_gpus, n, n, stages)


def static_layout(prob: Problem, tp: int) -> Layout | None:
    n = prob.cluster.count
    stages = _stages(prob, (tp,) * (n // tp), "both")
    return None if stages is None else Layout(Policy.STATIC, tp, n if tp > 1 else 0, n, n, stages)


def waa_layout(prob: Problem, policy: Policy, tp: int, tp_gpus: int, encode_gpus: int) -> Layout | None:
    n = prob.cluster.count
    s = WAASchedule(policy, 1, 1, tp, tp_gpus, encode_gpus, n - encode_gpus)  # validates the split
    enc = _stages(prob, s.encode_stages, "encode")
    dec = _stages(prob, s.decode_stages, "decode")
    if enc is None or dec is None:
        return None
    return Layout(policy, tp, tp_gpus, encode_gpus, n - encode_gpus, enc + dec)


# --- stage-group times --------------------------------------------------------------------------

def spans_ranks(stages: tuple[Stage, ...]) -> bool:
    """Whether a group of stages (a pipeline, a TP group) spans several ranks: every rank then computes in bursts
    between waits for the others' messages while the others compute too, and its computed terms take the profile's
    rank slowdown. A one-rank WAA group computes back to back, as the kernel tables were timed (measured on the
    CPU: a 1+1 WAA-C plan within 3 % of its prediction without the factor, 25 % slower than predicted with it)."""
    return sum(s.tp for s in stages) >= 2


def concurrent_times(concurrency: float, t_enc, t_dec, enc_alone: bool, dec_alone: bool):
    """WAA's encode interval and decode iteration with the two groups computing at the same time: the busier
    group computes all period and the other's work overlaps it, both ``concurrency`` times slower while they
    overlap, so a one-rank group (``enc_alone`` / ``dec_alone``; a group spanning ranks has the rank slowdown
    already) takes ``(concurrency - 1) * min(t_enc, t_dec)`` longer. 1: the groups do not share compute (GPUs)."""
    if concurrency == 1.0:
        return t_enc, t_dec
    both = (concurrency - 1.0) * np.minimum(t_enc, t_dec)
    return (t_enc + both if enc_alone else t_enc), (t_dec + both if dec_alone else t_dec)


def _group_cost(prob: Problem, stages: tuple[Stage, ...], cost: CostModel | None) -> CostModel:
    """The cost model of one group of stages: with ``prob.slowdown`` where it ``spans_ranks``."""
    cost = cost or prob.cost
    if prob.slowdown == 1.0 or not spans_ranks(stages):
        return cost
    return dataclasses.replace(cost, slowdown=prob.slowdown)


def _encode_times(prob: Problem, stages: tuple[Stage, ...], batch, cost: CostModel | None = None):
    """Per-stage encode seconds (a list of arrays) and the combined in-range mask."""
    cost = _group_cost(prob, stages, cost)
    memo = {}  # stages repeat (48 devices are a handful of distinct stages): compute each kind once
    times, ok = [], True
    for i, s in enumerate(stages):
        key = (s.tp, s.n_layers, s.n_enc_layers, i == len(stages) - 1, i == 0)
        if key not in memo:
            memo[key] = cost.stage_encode(*key[:4], batch, first=key[4])
        t, o = memo[key]
        times.append(t)
        ok = ok & o
    return times, ok


def _decode_times(prob: Problem, stages: tuple[Stage, ...], rows, ctx: float | None = None,
                  cost: CostModel | None = None):
    cost = _group_cost(prob, stages, cost)
    memo = {}
    times, ok = [], True
    for i, s in enumerate(stages):
        key = (s.tp, s.n_layers, i == len(stages) - 1, i == 0)
        if key not in memo:
            memo[key] = cost.stage_decode(*key[:3], rows, ctx, first=key[3])
        t, o = memo[key]
        times.append(t)
        ok = ok & o
    return times, ok




def _memory(prob: Problem, stages: tuple[Stage, ...], rows, encode_tokens, kv_rows_in_flight=None,
            recv_rows=0.0):
    """Peak bytes per stage device (a list of arrays). ``kv_rows_in_flight``: a WAA encode stage's prompts held
    until handed off, instead of a cache; ``recv_rows``: a WAA decode stage's hand-off receive buffers (prompts)."""
    m, st = prob.model, prob.stats
    max_ctx = st.out_max if m.is_encoder_decoder else st.in_max + st.out_max
    out, memo = [], {}
    for i, s in enumerate(stages):
        key = (s.tp, s.n_layers, s.n_enc_layers, i == 0, i == len(stages) - 1)
        if key in memo:
            out.append(memo[key])
            continue
        w = stage_weight_bytes(m, s.tp, s.n_layers, s.n_enc_layers, i == 0, i == len(stages) - 1)
        kv = kv_bytes(m, s.tp, s.n_layers, rows, max_ctx, st.in_max)
        prompt_kv = m.kv_bytes_per_token(s.tp) * s.n_layers * st.in_max  # one prompt's KV, at its longest
        if kv_rows_in_flight is not None:  # WAA encode stage: prompts' KV until handed off
            kv = prompt_kv * np.asarray(kv_rows_in_flight, float)
        kv = kv + prompt_kv * np.asarray(recv_rows, float)
        memo[key] = w + kv + activation_bytes(m, s.tp, encode_tokens)
        out.append(memo[key])
    return out


def _fits(prob: Problem, mem: list) -> np.ndarray:
    ok = True
    for m in mem:
        ok = ok & (m <= prob.capacity_bytes)
    return ok


# --- box functions ------------------------------------------------------------------------------

def _rra_decode(prob: Problem, stages, bd, cost: CostModel | None = None, ctx: float | None = None):
    """RRA decode-iteration seconds for B_D = bd (one micro-batch per stage) at context ``ctx`` (default: the steady
    batch's), its in-range mask and the token hop back to the driver (0 with one stage)."""
    p = len(stages)
    dec, ok_d = _decode_times(prob, stages, bd / p, ctx, cost)
    if p == 1:
        return dec[0], ok_d, 0.0
    # A micro-batch's next iteration needs its tokens back at the driver: with P micro-batches over P stages the
    # pipeline has no slack, so one round trip (every stage, then the token hop) bounds the iteration too.
    ret, ok_r = (cost or prob.cost).token_return(bd / p)
    return np.maximum(p * np.maximum.reduce(dec), sum(dec) + ret), ok_d & ok_r, ret


def _rra_phases(prob: Problem, stages, be, bd, cost: CostModel | None = None, ctx: float | None = None):
    """RRA (and static) encode-phase and decode-iteration seconds for B_E = be and B_D = bd (one micro-batch per
    stage)."""
    p = len(stages)
    enc, ok_e = _encode_times(prob, stages, be / p, cost)
    t_dec, ok_d, ret = _rra_decode(prob, stages, bd, cost, ctx)
    if p == 1:
        return enc[0], t_dec, ok_e & ok_d
    return sum(enc) + (p - 1) * np.maximum.reduce(enc) + ret, t_dec, ok_e & ok_d


def rra_box(prob: Problem, lay: Layout, be_lo, be_hi, nd_lo, nd_hi, detail: bool = False):
    """RRA over boxes of (B_E, N_D). Returns (throughput upper, latency lower, may_fit)."""
    be_lo, be_hi = np.asarray(be_lo, float), np.asarray(be_hi, float)
    nd_lo, nd_hi = np.asarray(nd_lo), np.asarray(nd_hi)
    stages = lay.stages
    # A phase runs I <= N_D iterations (it ends when its batch is empty), I non-decreasing in B_E and N_D.
    it_lo, it_hi = prob.phase_iters(be_lo, nd_lo), prob.phase_iters(be_hi, nd_hi)
    ratio = prob.mean_iters / it_hi  # mean decode rows / B_E, smallest in the box
    t_enc, t_dec, ok_e = _rra_phases(prob, stages, be_lo, be_lo * ratio)
    if np.array_equal(be_lo, be_hi):
        thr = be_hi / (t_enc + it_lo * t_dec)
    else:
        # Cycle time per encoded query never grows with B_E (per-row cost never grows with batch
        # size), so the throughput of any B_E in the box is at most that at the box's largest B_E.
        t_enc_hi, t_dec_hi, _ = _rra_phases(prob, stages, be_hi, be_hi * ratio, prob.bound_cost)
        thr = be_hi / (t_enc_hi + it_lo * t_dec_hi)
    bd = be_lo * ratio
    phases = np.maximum(1, np.ceil(prob.k_q / nd_hi))
    # The bound-length query's iterations run beside more rows than the phase's mean (``QueryRows``).
    point = np.array_equal(be_lo, be_hi) and np.array_equal(nd_lo, nd_hi)
    rows_q = prob.query_rows.rows(be_lo, nd_lo) if point else prob.query_rows.lower(be_lo, nd_lo, nd_hi)
    t_dec_q, ok_q, _ = _rra_decode(prob, stages, rows_q)
    lat = phases * t_enc + prob.k_q * t_dec_q
    refill = be_lo * prob.phases[nd_hi]  # the batch at a phase start
    rows = np.ceil(refill) + be_lo  # cache rows: the refilled batch plus an incoming encode batch
    mem = _memory(prob, stages, rows, be_lo / len(stages) * prob.stats.in_max)
    ok = ok_e & ok_q & _fits(prob, mem)
    if detail:
        return dict(thr=thr, lat=lat, ok=ok, t_enc=t_enc, t_dec=t_dec, bd=bd, mem=mem, refill=refill,
                    rows_q=rows_q, t_dec_q=t_dec_q)
    return thr, lat, ok


def waa_box(prob: Problem, lay: Layout, be_lo, be_hi, bm_lo, bm_hi, detail: bool = False):
    """WAA over boxes of (B_E, B_m). Returns (throughput upper, latency lower, may_fit)."""
    be_lo, be_hi = np.asarray(be_lo, float), np.asarray(be_hi, float)
    bm_lo, bm_hi = np.asarray(bm_lo, float), np.asarray(bm_hi, float)
    enc_st, dec_st = lay.group("encode"), lay.group("decode")
    st = prob.stats
    ek = float(np.dot(st.k_lengths, st.k_probs))
    enc, ok_e = _encode_times(prob, enc_st, be_lo)
    t_enc_int, t_enc_lat = np.maximum.reduce(enc), sum(enc)
    hand, ok_h = prob.cost.kv_handoff(be_lo)
    bd_lo, bd_hi = be_lo * ek, be_hi * ek
    m_lo = np.maximum(1, np.ceil(bd_lo / bm_hi))  # fewest micro-batches in the box
    m_hi = np.maximum(1, np.ceil(bd_hi / bm_lo))  # most micro-batches in the box
    # Sum of stage times is smallest with the most, smallest micro-batches; M * max_s t_s is
    # smallest with the fewest (per-row cost never grows with batch size).
    small, ok_1 = _decode_times(prob, dec_st, np.maximum(bd_lo / m_hi, 1e-9))
    big, ok_2 = _decode_times(prob, dec_st, np.maximum(bd_lo / m_lo, 1e-9), None,
                              None if np.array_equal(m_lo, m_hi) else prob.bound_cost)
    chain = sum(small)
    if len(dec_st) > 1:  # a micro-batch's tokens come back to the decode driver before its next iteration
        ret, ok_r = prob.cost.token_return(np.maximum(bd_lo / m_hi, 1e-9))
        chain, ok_1 = chain + ret, ok_1 & ok_r
    t_dec = np.maximum(chain, m_lo * np.maximum.reduce(big))
    t_int = t_enc_int
    t_enc_int, t_dec = concurrent_times(prob.concurrency, t_enc_int, t_dec, not spans_ranks(enc_st),
                                        not spans_ranks(dec_st))
    t_enc_lat = t_enc_lat + (t_enc_int - t_int)  # a one-rank encode group: its one stage is the interval
    on_compute = prob.profile.handoff_on_compute
    coupling = prob.profile.waa_period_factor  # the groups' lockstep (Profile.waa_period_factor)
    period = coupling * np.maximum(np.maximum(t_dec + hand if on_compute else t_dec, t_enc_int), hand)
    thr = be_hi / period
    if not (np.array_equal(be_lo, be_hi) and np.array_equal(bm_lo, bm_hi)):
        # Per-query bound: a decode iteration costs at least B_D max_s t_s(B_m)/B_m (no micro-batch
        # exceeds B_m and per-row cost never grows with batch size), the encode interval and the
        # hand-off at least their per-query cost at the box's largest B_E.
        full, _ = _decode_times(prob, dec_st, bm_hi, None, prob.bound_cost)
        enc_hi, _ = _encode_times(prob, enc_st, be_hi, prob.bound_cost)
        hand_hi, _ = prob.bound_cost.kv_handoff(be_hi)
        dec_pq = ek * np.maximum.reduce(full) / bm_hi + (hand_hi / be_hi if on_compute else 0.0)
        per_query = coupling * np.maximum(np.maximum(dec_pq, np.maximum.reduce(enc_hi) / be_hi), hand_hi / be_hi)
        with np.errstate(divide="ignore"):
            thr = np.minimum(thr, 1 / per_query)
    # Encode start to merge: the encoder starts a batch when the merge HANDOFF_DEPTH batches before it sends its
    # credit, so with the decoder the bottleneck a batch waits HANDOFF_DEPTH periods; with the encoder the
    # bottleneck the decoder waits for the batch (its encode latency and hand-off). Then k_q iterations: the first
    # right after the merge, every later one a period on.
    to_merge = np.maximum(t_enc_lat + hand, HANDOFF_DEPTH * period)
    lat = to_merge + coupling * t_dec + (prob.k_q - 1) * period if prob.k_q >= 1 else t_enc_lat
    rows = np.ceil(bd_lo) + be_lo
    mem = _memory(prob, enc_st, 0, be_lo * st.in_max, kv_rows_in_flight=HANDOFF_DEPTH * be_lo) + \
        _memory(prob, dec_st, rows, np.minimum(bm_lo, bd_lo), recv_rows=HANDOFF_DEPTH * be_lo)
    ok = ok_e & ok_h & ok_1 & ok_2 & _fits(prob, mem) & (bm_lo <= prob.max_batch(Kernel.ATTN_DECODE))
    if detail:
        return dict(thr=thr, lat=lat, ok=ok, t_enc=t_enc_int, t_dec=t_dec, bd=bd_lo, mem=mem, period=period)
    return thr, lat, ok


def static_points(prob: Problem, lay: Layout, batch, detail: bool = False):
    """Static batching at batch sizes ``batch`` (exact estimates, no boxes)."""
    b = np.atleast_1d(np.asarray(batch, float))
    stages, p, st = lay.stages, len(lay.stages), prob.stats
    shift = 0 if prob.model.is_encoder_decoder else 1
    iters = np.array([prob.workload.output_len.expected_max(int(x)) for x in b]) - shift
    # Every row stays to the end: the context grows from the prompt by one token per iteration (from the
    # batch's longest prompt when the backend attends every row over the longest).
    prompt = st.prompt_len(b, prob.cost.padded_decode)
    ctx = (0.0 if prob.model.is_encoder_decoder else prompt) + 1 + np.maximum(iters - 1, 0) / 2  # iterations 0..k-1
    # The same pipeline as RRA's phases (fill and drain, the tokens' hop back to the driver).
    t_enc, t_dec = np.zeros_like(b), np.zeros_like(b)
    ok_d = np.ones(b.shape, dtype=bool)
    for i, c in enumerate(ctx):  # context differs per batch size: one lookup each
        e, d, ok = _rra_phases(prob, stages, b[i:i + 1], b[i:i + 1], ctx=float(c))
        t_enc[i], t_dec[i], ok_d[i] = np.ravel(e)[0], np.ravel(d)[0], np.ravel(ok)[0]
    thr = b / (t_enc + iters * t_dec)
    k_max = prob.workload.output_len.max - shift
    lat = t_enc + k_max * t_dec
    mem = _memory(prob, stages, b, b / p * st.in_max)
    ok = ok_d & _fits(prob, mem)
    if detail:
        return dict(thr=thr, lat=lat, ok=ok, t_enc=t_enc, t_dec=t_dec, bd=b, mem=mem)
    return thr, lat, ok


# --- schedules <-> points -----------------------------------------------------------------------

def layout_for(prob: Problem, s: Schedule) -> Layout:
    if s.num_gpus != prob.cluster.count:
        raise ExeGPTError(f"schedule uses {s.num_gpus} devices but the cluster has {prob.cluster.count}")
    if not prob.model.valid_tp(s.tp):
        raise ExeGPTError(f"tp={s.tp} must divide {prob.model.name}'s {prob.model.n_heads} heads and "
                          f"{prob.model.n_kv_heads} KV heads")
    if not prob.profile.supports_tp(s.tp):
        raise ExeGPTError(f"profile {prob.profile.id} has no tables at tp={s.tp}; it has "
                          f"tp {prob.profile.tp_degrees()}")
    if isinstance(s, RRASchedule):
        lay = rra_layout(prob, s.tp, s.tp_gpus)
    elif isinstance(s, WAASchedule):
        lay = waa_layout(prob, s.policy, s.tp, s.tp_gpus, s.encode_gpus)
    else:
        lay = static_layout(prob, s.tp)
    if lay is None:
        raise ExeGPTError(f"{prob.model.name} does not fit on {prob.cluster.label} with {s}: "
                          f"its weights exceed device memory or there are more stages than layers")
    return lay


def estimate(prob: Problem, lay: Layout, s: Schedule) -> Estimate:
    """The exact estimate of one schedule on its layout."""
    if isinstance(s, RRASchedule):
        if s.decode_iters > prob.max_decode_iters:
            raise ExeGPTError(f"decode_iters={s.decode_iters} exceeds the longest output's "
                              f"{prob.max_decode_iters} decode iterations")
        d = rra_box(prob, lay, s.encode_batch, s.encode_batch, s.decode_iters, s.decode_iters, detail=True)
        latency_len = prob.latency_len
    elif isinstance(s, WAASchedule):
        d = waa_box(prob, lay, s.encode_batch, s.encode_batch, s.micro_batch, s.micro_batch, detail=True)
        latency_len = prob.latency_len
    else:
        d = static_points(prob, lay, s.batch, detail=True)
        latency_len = prob.workload.output_len.max
    thr = float(np.ravel(d["thr"])[0])
    return Estimate(
        throughput_seq_s=thr, throughput_tok_s=thr * prob.workload.output_len.mean(),
        latency_s=float(np.ravel(d["lat"])[0]), latency_len=int(latency_len),
        encode_stage_s=float(np.ravel(d["t_enc"])[0]), decode_step_s=float(np.ravel(d["t_dec"])[0]),
        decode_batch=float(np.ravel(d["bd"])[0]), refill_batch=float(np.ravel(d.get("refill", d["bd"]))[0]),
        memory_bytes=tuple(float(np.ravel(m)[0]) for m in d["mem"]),
        memory_capacity_bytes=prob.capacity_bytes)


def simulate(schedule: Schedule, workload: Workload, profile: Profile | None = None, *, model="opt-13b",
             devices="4xA40", bound: LatencyBound | float = math.inf,
             memory_fraction: float = MEMORY_FRACTION) -> Estimate:
    """Estimate one schedule. ``profile`` defaults to the built-in profile of ``model`` on ``devices``."""
    from .optimize import problem  # the API module resolves names, profiles and devices

    prob = problem(workload, bound, model=model, devices=devices, profile=profile, memory_fraction=memory_fraction)
    return estimate(prob, layout_for(prob, schedule), schedule)
