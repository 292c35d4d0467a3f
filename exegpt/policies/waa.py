"""WAA (Workload-Aware Allocation, -C by compute, -M by memory): an encode pipeline and a decode pipeline on
disjoint devices, running at once.

Knobs: B_E (``encode_batch``), B_m (``micro_batch``), TP degree and the devices using it, and the split of the
devices between the groups (WAA-C balances the groups' compute, WAA-M their memory: the paper's rule, at each B_E;
with ``SearchSpace(waa_split='searched')`` every split is searched). The estimate:

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
    lockstep of the two groups (``Profile.waa_period_factor``, 1 unless measured), and at least (encode latency
    + hand-off) / HANDOFF_DEPTH: the encoder starts a batch only when the merge HANDOFF_DEPTH batches back has
    sent its credit (a two-stage encode group ran 0.67x its estimated throughput without this term);
  * throughput = B_E / T; latency(L) = max(encode latency + hand-off, HANDOFF_DEPTH T) + T_D + (k_L - 1) T:
    the paper's "buffer time" before a batch merges is one period; the built-in runner's encoder runs up to
    HANDOFF_DEPTH batches ahead of the merges, so when the decoder is the bottleneck a batch waits that many
    periods from its encode start (measured on the simulated engine, ``exegpt.sim``, which runs the
    runner's drivers), and when the encoder is, its encode latency and hand-off. Then its first iteration
    right after the merge, every later one a period on.

The encode driver prefills batches of up to B_E waiting requests and hands each one's KV to the decode group,
at most ``HANDOFF_DEPTH`` batches ahead of the decode driver's merges (it waits for a credit). The decode driver,
whenever its cache has room for a batch and a request has arrived that it has not merged, waits for the next batch
and merges it (one batch per decode iteration, the paper's period max(encode, decode)); then it runs one decode
iteration of every active row in micro-batches of B_m rows. The prefill's token is the first output token.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from ..errors import ExeGPTError
from ..memory import stage_weight_bytes
from ..problem import Problem
from ..profile import Kernel
from ..rules import SteadyMarker, split_by, waa_cache_rows
from ..schedule import Policy, check_tp, stage_degrees, with_tp_defaults
from ..search.bnb import Space
from ..stages import Layout, Terms, concurrent_times, decode_times, encode_times, fits, grid_above, layer_floor_s, \
    layer_per_row_s, place_stages, rows_fit, spans_ranks, stage_memory, tp_gpu_counts
from .base import DECODE, ENCODE, AwaitCredit, Decode, DriverStats, EndHandOffs, Merge, Prefill, View, \
    WaitArrival, drop_finished

NAMES = (Policy.WAA_C, Policy.WAA_M)

HANDOFF_DEPTH = 2
"""Encoded batches in flight between the groups. The encoder runs at most this many batches ahead of the
decoder's merges (it keeps their KV until sent), and the decode ranks keep as many hand-off receives posted, each
into its own buffer, so that a batch's messages flow while the decoder computes (the built-in runner)."""


@dataclass(frozen=True, slots=True)
class WAASchedule:
    """Workload-Aware Allocation: an encode pipeline and a decode pipeline on disjoint devices."""

    policy: Policy
    """WAA_C or WAA_M: how the split ``encode_gpus``/``decode_gpus`` was chosen."""
    encode_batch: int
    """B_E: queries per encode batch; one encode batch enters per decode iteration."""
    micro_batch: int
    """B_m: rows per decode micro-batch in the decode pipeline."""
    tp: int
    tp_gpus: int
    """Devices using TP, taken from the encode group first, then from the decode group."""
    encode_gpus: int
    decode_gpus: int

    def __post_init__(self):
        if self.policy not in (Policy.WAA_C, Policy.WAA_M):
            raise ExeGPTError(f"WAASchedule needs policy waa_c or waa_m, got {self.policy!r}")
        if self.encode_batch < 1:
            raise ExeGPTError(f"WAA: encode_batch={self.encode_batch} must be >= 1")
        if self.micro_batch < 1:
            raise ExeGPTError(f"WAA: micro_batch={self.micro_batch} must be >= 1")
        if self.encode_gpus < 1 or self.decode_gpus < 1:
            raise ExeGPTError(f"WAA needs >= 1 encode and >= 1 decode device, got "
                              f"{self.encode_gpus}+{self.decode_gpus}")
        check_tp(self.tp, self.tp_gpus, self.num_gpus, "WAA")
        if self.tp > 1 and (self.encode_tp_gpus % self.tp or self.decode_tp_gpus % self.tp):
            raise ExeGPTError(f"WAA: tp_gpus={self.tp_gpus} splits a TP group of {self.tp} across the "
                              f"{self.encode_gpus}-device encode group and the decode group")

    @property
    def num_gpus(self) -> int:
        return self.encode_gpus + self.decode_gpus

    @property
    def encode_tp_gpus(self) -> int:
        return min(self.tp_gpus, self.encode_gpus)

    @property
    def decode_tp_gpus(self) -> int:
        return self.tp_gpus - self.encode_tp_gpus

    @property
    def encode_stages(self) -> tuple[int, ...]:
        return stage_degrees(self.encode_gpus, self.tp, self.encode_tp_gpus)

    @property
    def decode_stages(self) -> tuple[int, ...]:
        return stage_degrees(self.decode_gpus, self.tp, self.decode_tp_gpus)


def layout_of(prob: Problem, policy: Policy, tp: int, tp_gpus: int, encode_gpus: int) -> Layout | None:
    n = prob.cluster.count
    s = WAASchedule(policy, 1, 1, tp, tp_gpus, encode_gpus, n - encode_gpus)  # validates the split
    enc = place_stages(prob, s.encode_stages, "encode")
    dec = place_stages(prob, s.decode_stages, "decode")
    if enc is None or dec is None:
        return None
    return Layout(policy, tp, tp_gpus, encode_gpus, n - encode_gpus, enc + dec)


def split_options(prob: Problem, policy: Policy, encode_batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The floor and ceiling encode-device counts of WAA-C (by compute) or WAA-M (by memory) for each
    B_E; both are kept (the paper's rounding is not recoverable, method doc §11.7)."""
    n, m, st, cost = prob.cluster.count, prob.model, prob.stats, prob.cost
    b = np.asarray(encode_batch, dtype=float)
    ek = float(np.dot(st.k_lengths, st.k_probs))
    enc_layers = m.n_encoder_layers if m.is_encoder_decoder else m.n_layers
    if policy is Policy.WAA_C:
        # Estimated encode and decode times of one period on one device (nearest profiled point).
        c_e = cost.stage_encode(1, m.n_layers, m.n_encoder_layers, True, b, first=True)[0]
        c_d = cost.stage_decode(1, m.n_layers, True, np.maximum(b * ek, 1), first=True)[0]
    else:
        max_ctx = st.out_max if m.is_encoder_decoder else st.in_max + st.out_max
        w_e = stage_weight_bytes(m, 1, 0 if m.is_encoder_decoder else m.n_layers, m.n_encoder_layers, True, True)
        w_d = stage_weight_bytes(m, 1, m.n_layers, 0, True, True)
        c_e = w_e + 2 * b * st.in_max * m.kv_bytes_per_token() * enc_layers
        c_d = w_d + (np.ceil(b * ek) + b) * max_ctx * m.kv_bytes_per_token() * m.n_layers
    share = n * c_e / (c_e + c_d)
    lo = np.clip(np.floor(share), 1, n - 1).astype(int)
    hi = np.clip(np.ceil(share), 1, n - 1).astype(int)
    return lo, hi


def box(prob: Problem, lay: Layout, be_lo, be_hi, bm_lo, bm_hi, detail: bool = False):
    """WAA over boxes of (B_E, B_m). Returns (throughput upper, latency lower, may_fit)."""
    be_lo, be_hi = np.asarray(be_lo, float), np.asarray(be_hi, float)
    bm_lo, bm_hi = np.asarray(bm_lo, float), np.asarray(bm_hi, float)
    enc_st, dec_st = lay.group("encode"), lay.group("decode")
    st = prob.stats
    ek = float(np.dot(st.k_lengths, st.k_probs))
    enc, ok_e = encode_times(prob, enc_st, be_lo)
    t_enc_int, t_enc_lat = np.maximum.reduce(enc), sum(enc)
    hand, ok_h = prob.cost.kv_handoff(be_lo)
    bd_lo, bd_hi = be_lo * ek, be_hi * ek
    m_lo = np.maximum(1, np.ceil(bd_lo / bm_hi))  # fewest micro-batches in the box
    m_hi = np.maximum(1, np.ceil(bd_hi / bm_lo))  # most micro-batches in the box
    # Sum of stage times is smallest with the most, smallest micro-batches; M * max_s t_s is
    # smallest with the fewest (per-row cost never grows with batch size).
    small, ok_1 = decode_times(prob, dec_st, np.maximum(bd_lo / m_hi, 1e-9))
    big, ok_2 = decode_times(prob, dec_st, np.maximum(bd_lo / m_lo, 1e-9), None,
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
    # The encoder starts a batch only when the merge HANDOFF_DEPTH batches back has sent its credit, and a batch
    # merges no sooner than its encode latency and hand-off after its start: that many batches per that time.
    period = np.maximum(period, coupling * (t_enc_lat + hand) / HANDOFF_DEPTH)
    point = np.array_equal(be_lo, be_hi) and np.array_equal(bm_lo, bm_hi)
    if not point:
        # No B_E that fits caches more rows (B_E (E[k] + 1)) than the decode group holds beside its weights, and no
        # micro-batch is larger than the decode batch: the box's largest B_E and B_m that can fit.
        be_hi = np.minimum(be_hi, np.maximum(np.floor(rows_fit(prob, dec_st) / (ek + 1)), be_lo))
        bm_hi = np.minimum(bm_hi, np.maximum(be_hi * ek, bm_lo))
    thr = be_hi / period
    if not point:
        # Per-query bound: a decode iteration costs at least B_D max_s t_s(B_m)/B_m (no micro-batch
        # exceeds B_m and per-row cost never grows with batch size), the encode interval and the
        # hand-off at least their per-query cost at the box's largest B_E.
        full, _ = decode_times(prob, dec_st, bm_hi, None, prob.bound_cost)
        enc_hi, _ = encode_times(prob, enc_st, be_hi, prob.bound_cost)
        hand_hi, _ = prob.bound_cost.kv_handoff(be_hi)
        # And one micro-batch of r <= B_m rows passes every decode stage in turn within an iteration of at most M
        # of them: per query E[k] sum_s t_s(r) / (M r), M at most the box's most micro-batches.
        m_top = np.maximum(1, np.ceil(be_hi * ek / bm_lo))
        dec_pq = ek * np.maximum(np.maximum.reduce(full), sum(full) / m_top) / bm_hi + \
            (hand_hi / be_hi if on_compute else 0.0)
        # And HANDOFF_DEPTH batches per encode latency and hand-off (the period's last term).
        enc_pq = np.maximum(np.maximum.reduce(enc_hi), (sum(enc_hi) + hand_hi) / HANDOFF_DEPTH) / be_hi
        per_query = coupling * np.maximum(np.maximum(dec_pq, enc_pq), hand_hi / be_hi)
        with np.errstate(divide="ignore"):
            thr = np.minimum(thr, 1 / per_query)
    # Encode start to merge: the encoder starts a batch when the merge HANDOFF_DEPTH batches before it sends its
    # credit, so with the decoder the bottleneck a batch waits HANDOFF_DEPTH periods; with the encoder the
    # bottleneck the decoder waits for the batch (its encode latency and hand-off). Then k_q iterations: the first
    # right after the merge, every later one a period on.
    to_merge = np.maximum(t_enc_lat + hand, HANDOFF_DEPTH * period)
    lat = to_merge + coupling * t_dec + (prob.k_q - 1) * period if prob.k_q >= 1 else t_enc_lat
    rows = np.ceil(bd_lo) + be_lo
    mem = stage_memory(prob, enc_st, 0, be_lo * st.in_max, kv_rows_in_flight=HANDOFF_DEPTH * be_lo) + \
        stage_memory(prob, dec_st, rows, np.minimum(bm_lo, bd_lo), recv_rows=HANDOFF_DEPTH * be_lo)
    ok = ok_e & ok_h & ok_1 & ok_2 & fits(prob, mem) & (bm_lo <= prob.max_batch(Kernel.ATTN_DECODE))
    if detail:
        return Terms(thr, lat, ok, t_enc_int, t_dec, bd_lo, mem, extra=dict(period=period))
    return thr, lat, ok


def prebound(prob: Problem, lay: Layout, be_max: int, bm_max: int) -> tuple[float, float]:
    """A cheap (throughput upper, latency lower) bound of a whole (B_E, B_m) space, from per-layer costs alone:
    ``box``'s per-query bound (the slowest decode stage's per-row cost E[k] times, no micro-batch larger than B_m
    or than the rows the decode group caches; the slowest encode stage's per-prompt cost, and the encode latency's
    and hand-off's over HANDOFF_DEPTH; the hand-off's) at the space's largest B_E and B_m, and k_q decode iterations
    of every decode layer at the least rows."""
    enc_st, dec_st = lay.group("encode"), lay.group("decode")
    enc = prob.model.is_encoder_decoder
    ek = float(np.dot(prob.stats.k_lengths, prob.stats.k_probs))
    be_fit = max(min(float(be_max), np.floor(rows_fit(prob, dec_st) / (ek + 1))), 1.0)
    bm = float(grid_above(max(min(float(bm_max), be_fit * ek), 1e-9)))
    be = float(grid_above(be_fit))
    hand = float(prob.bound_cost.kv_handoff(np.array([be]))[0][0]) / be
    on_compute, coupling = prob.profile.handoff_on_compute, prob.profile.waa_period_factor
    dec_pq = ek * max(s.n_layers * layer_per_row_s(prob, s.tp, "decode", bm) for s in dec_st) + \
        (hand if on_compute else 0.0)
    enc_s = [(s.n_enc_layers if enc else s.n_layers) * layer_per_row_s(prob, s.tp, "encode", be) for s in enc_st]
    enc_pq = max(max(enc_s), (sum(enc_s) + hand) / HANDOFF_DEPTH)
    per_query = coupling * max(dec_pq, enc_pq, hand)
    return (1 / per_query if per_query > 0 else math.inf), \
        max(prob.k_q, 0) * coupling * sum(s.n_layers * layer_floor_s(prob, s.tp) for s in dec_st)


def layout(prob: Problem, s: WAASchedule) -> Layout | None:
    return layout_of(prob, s.policy, s.tp, s.tp_gpus, s.encode_gpus)


def estimate_detail(prob: Problem, lay: Layout, s: WAASchedule) -> tuple[Terms, int]:
    """The estimate's terms at one schedule and the output length its latency is of."""
    return box(prob, lay, s.encode_batch, s.encode_batch, s.micro_batch, s.micro_batch, detail=True), \
        prob.latency_len


def spaces(prob: Problem, policy, tps: list[int], space) -> list[tuple[Layout, Space]]:
    """One search space of (B_E, B_m) per TP configuration and encode-device count: those the split rule allows
    (``space.waa_split`` 'rule', each admitting the B_E whose rule gives it), or every one ('searched')."""
    n = prob.cluster.count
    if n < 2:
        return []  # WAA needs an encode and a decode device
    be_max = space.max_encode_batch
    bm_max = int(min(space.max_micro_batch, prob.max_batch(Kernel.ATTN_DECODE)))
    if space.waa_split == "searched":
        splits = {ne: None for ne in range(1, n)}
    else:
        lo_split, hi_split = split_options(prob, policy, np.arange(1, be_max + 1))
        splits = {}
        for ne in sorted(set(lo_split) | set(hi_split)):
            allowed = (lo_split == ne) | (hi_split == ne)       # allowed[b - 1]: B_E = b may use ne
            prefix = np.concatenate([[0], np.cumsum(allowed)])
            splits[int(ne)] = (lambda prefix: lambda lo, hi: prefix[hi[:, 0]] - prefix[lo[:, 0] - 1] > 0)(prefix)
    out = []
    for ne, adm in splits.items():
        for t in tps:
            for g in tp_gpu_counts(n, t):
                if t > 1 and (min(g, ne) % t or (g - min(g, ne)) % t):
                    continue  # a TP group would straddle the encode/decode boundary
                lay = layout_of(prob, policy, t, g, ne)
                if lay is None:
                    continue
                fn = (lambda lay: lambda lo, hi: box(prob, lay, lo[:, 0], hi[:, 0], lo[:, 1], hi[:, 1]))(lay)
                pre = (lambda lay: lambda: prebound(prob, lay, be_max, bm_max))(lay)
                out.append((lay, Space(fn, (1, 1), (be_max, bm_max), adm, pre)))
    return out


def schedule_at(lay: Layout, point: tuple[int, ...], num_gpus: int) -> WAASchedule:
    return WAASchedule(lay.policy, point[0], point[1], lay.tp, lay.tp_gpus, lay.encode_gpus, lay.decode_gpus)


def parse(policy, fields: dict, num_gpus: int) -> WAASchedule:
    """A schedule from CLI fields (``encode_batch``, ``micro_batch``, ``tp``, ``tp_gpus``, ``encode_gpus``)."""
    with_tp_defaults(fields, num_gpus)
    fields.setdefault("encode_gpus", num_gpus // 2)
    fields.setdefault("decode_gpus", num_gpus - fields["encode_gpus"])
    return WAASchedule(policy=policy, **fields)


def describe(s: WAASchedule) -> str:
    return (f"{s.policy.value.upper().replace('_', '-')} B_E={s.encode_batch} B_m={s.micro_batch} "
            f"TP{s.tp}x{s.tp_gpus} {s.encode_gpus}+{s.decode_gpus}")


def stage_roles(schedule) -> tuple[tuple[str, int], ...]:
    """(role, TP degree) of each stage the schedule implies, in plan order: encode stages, then decode stages."""
    return tuple(("encode", t) for t in schedule.encode_stages) + tuple(("decode", t) for t in schedule.decode_stages)


def from_fields(fields: dict) -> WAASchedule:
    return WAASchedule(**fields)


# --- drivers ------------------------------------------------------------------------------------------

def encoder(take):
    """The driver of an encode group that hands its batches to a decode group: while requests wait, prefill the
    batch ``take(view, waiting)`` picks and hand it off, at most ``HANDOFF_DEPTH`` batches ahead of the decode
    group's merges (it waits for a credit); at the end, tell the decode group and collect the last credits."""

    def encode(view: View):
        sent = credits = 0
        while True:
            if sent - credits >= HANDOFF_DEPTH:  # backpressure: wait until the decoder merged a batch
                yield AwaitCredit()
                credits += 1
            waiting = view.waiting()
            if not waiting:
                if not view.more_to_come():
                    break
                yield WaitArrival()
                continue
            yield Prefill(take(view, waiting), 1)
            sent += 1
        yield EndHandOffs()
        for _ in range(sent - credits):
            yield AwaitCredit()
        return None

    return encode


def drivers(plan, control=None) -> dict:
    """The encode driver and the decode driver of a WAA plan. With ``control`` (``exegpt.replan.DriftControl``), the
    decode driver shows it the requests that finished before each iteration and takes the plan it holds: a
    re-planned B_m applies from that iteration on (B_E, the groups and the cache stay)."""
    s = plan.schedule
    rows = waa_cache_rows(plan)
    encode = encoder(lambda view, waiting: tuple(waiting[:s.encode_batch]))

    def decode(view: View):
        micro_batch = s.micro_batch
        alive: list[int] = []  # the requests in cache rows, in row order
        enc: list[float] = []
        dec: list[tuple[float, int]] = []
        steady = SteadyMarker(enc, dec)
        merged, ended = 0, False
        while True:
            if control is not None:  # between iterations: the drift monitor reads what finished; a plan change applies
                micro_batch = control.between_phases(view, alive).schedule.micro_batch
            alive = yield from drop_finished(view, alive)
            # One batch joins per decode iteration: wait for it whenever it has room and is coming.
            if not ended and len(alive) + s.encode_batch <= rows and \
                    (view.arrived() > merged or merged == view.num_runnable()):
                m = yield Merge()
                if m is None:
                    ended = True
                    steady.end(view.now())
                else:
                    alive += m.rids
                    merged += len(m.rids)
                    enc.append(m.encode_s)
            active = [r for r in alive if not view.done(r)]
            if not active:
                if ended:
                    break
                if view.arrived() == merged < view.num_runnable():
                    yield WaitArrival()
                continue
            t = view.now()
            if len(active) >= plan.estimate.decode_batch:
                steady.begin(t)
            steps = yield Decode(tuple(tuple(mb) for mb in split_by(active, micro_batch)), 1)
            dec.append((view.now() - t, steps[0]))
        return DriverStats(tuple(enc), tuple(dec), steady.window(view.now()))

    return {ENCODE: encode, DECODE: decode}


def cache_rows(plan, group: str) -> int:
    return waa_cache_rows(plan) if group == DECODE else plan.schedule.encode_batch


# --- drift: the cheap move ----------------------------------------------------------------------------

def retune_space(prob: Problem, lay: Layout, plan) -> Space:
    """What a running WAA plan can change between decode iterations without moving weights or cache
    (``exegpt.replan``): B_m, at its B_E and on its layout."""
    be = float(plan.schedule.encode_batch)
    bm_max = int(min(waa_cache_rows(plan), prob.max_batch(Kernel.ATTN_DECODE)))

    def fn(lo, hi):
        b = np.full(len(lo), be)
        return box(prob, lay, b, b, lo[:, 0], hi[:, 0])

    return Space(fn, (1,), (max(1, bm_max),))


def retune_point(s: WAASchedule) -> tuple[int, ...]:
    """The schedule's point in ``retune_space``."""
    return (s.micro_batch,)


def retuned(s: WAASchedule, point: tuple[int, ...]) -> WAASchedule:
    """The schedule at a point of ``retune_space``."""
    return dataclasses.replace(s, micro_batch=int(point[0]))
