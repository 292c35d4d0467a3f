"""RRA (Round-Robin Allocation): every device pipelines every layer; encode phases and decode phases alternate.

Knobs: B_E (``encode_batch``) and N_D (``decode_iters``), TP degree and the devices using it. The estimate:

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

The driver: at each encode phase, free the rows of finished requests and admit ``rra_admit`` of the waiting
requests (as many as finished since the last phase, at least B_E, never past the refill target nor the cache's
rows), prefilled in ``rra_chunks`` chunks of one micro-batch per stage; then up to N_D decode iterations of the
active rows in one micro-batch per stage (paper §11.1), finished rows leaving at once. With nothing to decode and
nothing waiting, it waits for the next arrival.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ..errors import ExeGPTError
from ..problem import Problem
from ..rules import SteadyMarker, SteadyStop, rra_admit, rra_cache_rows, rra_chunks, rra_refill_target, split_even
from ..schedule import Policy, check_tp, one_pipeline_roles, stage_degrees, with_tp_defaults
from ..search.bnb import Space
from ..stages import Layout, Terms, fits, grid_above, layer_floor_s, layer_per_row_s, max_decode_rows, \
    pipeline_decode, pipeline_phases, place_stages, rows_fit, stage_memory, tp_gpu_counts
from .base import MAIN, Decode, DriverStats, Prefill, View, WaitArrival, drop_finished

NAMES = (Policy.RRA,)
ENCODER_DECODER = True
"""Its driver runs encoder-decoder models on the runner: whole prompts only (no chunks, no recomputation)."""


@dataclass(frozen=True, slots=True)
class RRASchedule:
    """Round-Robin Allocation: encode ``encode_batch`` queries, then ``decode_iters`` decode iterations."""

    encode_batch: int
    """B_E: queries encoded per encode phase (= expected completions per decode phase)."""
    decode_iters: int
    """N_D: decode iterations between two encode phases (encoding frequency 1/N_D)."""
    tp: int
    """TP degree of the TP stages."""
    tp_gpus: int
    """Devices that use TP (a multiple of ``tp``); the other devices are single-device stages."""
    num_gpus: int
    policy: Policy = Policy.RRA

    def __post_init__(self):
        if self.encode_batch < 1:
            raise ExeGPTError(f"RRA: encode_batch={self.encode_batch} must be >= 1")
        if self.decode_iters < 1:
            raise ExeGPTError(f"RRA: decode_iters={self.decode_iters} must be >= 1")
        check_tp(self.tp, self.tp_gpus, self.num_gpus, "RRA")
        if self.policy is not Policy.RRA:
            raise ExeGPTError(f"RRASchedule has policy {self.policy!r}")

    @property
    def stages(self) -> tuple[int, ...]:
        return stage_degrees(self.num_gpus, self.tp, self.tp_gpus)


def layout_of(prob: Problem, tp: int, tp_gpus: int) -> Layout | None:
    n = prob.cluster.count
    stages = place_stages(prob, stage_degrees(n, tp, tp_gpus), "both")
    return None if stages is None else Layout(Policy.RRA, tp, tp_gpus, n, n, stages)


def box(prob: Problem, lay: Layout, be_lo, be_hi, nd_lo, nd_hi, detail: bool = False):
    """RRA over boxes of (B_E, N_D). Returns (throughput upper, latency lower, may_fit)."""
    be_lo, be_hi = np.asarray(be_lo, float), np.asarray(be_hi, float)
    nd_lo, nd_hi = np.asarray(nd_lo), np.asarray(nd_hi)
    stages = lay.stages
    # A phase runs I <= N_D iterations (it ends when its batch is empty), I non-decreasing in B_E and N_D.
    it_lo, it_hi = prob.phase_iters(be_lo, nd_lo), prob.phase_iters(be_hi, nd_hi)
    ratio = prob.mean_iters / it_hi  # mean decode rows / B_E, smallest in the box
    t_enc, t_dec, ok_e = pipeline_phases(prob, stages, be_lo, be_lo * ratio)
    if np.array_equal(be_lo, be_hi):
        thr = be_hi / (t_enc + it_lo * t_dec)
    else:
        # Cycle time per encoded query never grows with B_E (per-row cost never grows with batch
        # size), so the throughput of any B_E in the box is at most that at the box's largest B_E.
        t_enc_hi, t_dec_hi, _ = pipeline_phases(prob, stages, be_hi, be_hi * ratio, prob.bound_cost)
        thr = be_hi / (t_enc_hi + it_lo * t_dec_hi)
        # Per encoded query a phase decodes E[k] rows: at least E[k] times the per-row decode cost of the largest
        # decode batch the box holds (B_E E[k] / I at its least I), which the memory (every stage caches every
        # row) and the profiled range cap too.
        p = len(stages)
        bd_cap = np.minimum(be_hi * prob.mean_iters / it_lo,
                            min(rows_fit(prob, stages), p * max_decode_rows(prob, stages)))
        bd_cap = np.maximum(bd_cap, 1e-9)
        t_dec_cap, _, _ = pipeline_decode(prob, stages, bd_cap, prob.bound_cost)
        thr = np.minimum(thr, 1 / (t_enc_hi / be_hi + prob.mean_iters * t_dec_cap / bd_cap))
    bd = be_lo * ratio
    phases = np.maximum(1, np.ceil(prob.k_q / nd_hi))
    # The bound-length query's iterations run beside more rows than the phase's mean (``QueryRows``).
    point = np.array_equal(be_lo, be_hi) and np.array_equal(nd_lo, nd_hi)
    rows_q = prob.query_rows.rows(be_lo, nd_lo) if point else prob.query_rows.lower(be_lo, nd_lo, nd_hi)
    t_dec_q, ok_q, _ = pipeline_decode(prob, stages, rows_q)
    lat = phases * t_enc + prob.k_q * t_dec_q
    refill = be_lo * prob.phases[nd_hi]  # the batch at a phase start
    rows = np.ceil(refill) + be_lo  # cache rows: the refilled batch plus an incoming encode batch
    mem = stage_memory(prob, stages, rows, be_lo / len(stages) * prob.stats.in_max)
    ok = ok_e & ok_q & fits(prob, mem)
    if detail:
        return Terms(thr, lat, ok, t_enc, t_dec, bd, mem, refill, extra=dict(rows_q=rows_q, t_dec_q=t_dec_q))
    return thr, lat, ok


def prebound(prob: Problem, lay: Layout, be_max: int) -> tuple[float, float]:
    """A cheap (throughput upper, latency lower) bound of a whole (B_E, N_D) space, from per-layer costs alone.
    Per encoded query the encode phase costs at least its slowest stage's per-prompt cost (P micro-batches of at
    most B_E / P prompts pass it) and the phase's decode iterations E[k] times the slowest stage's per-row cost
    (micro-batches of at most the rows the memory caches, over P); the bound-length query's k_q decode iterations
    at least every layer at the least rows (costs never fall as rows grow)."""
    stages, p = lay.stages, len(lay.stages)
    enc = prob.model.is_encoder_decoder
    bd = min(be_max * prob.mean_iters / float(prob.phase_iters(1, 1)), rows_fit(prob, stages),
             p * max_decode_rows(prob, stages))
    b_enc, b_dec = float(grid_above(be_max / p)), float(grid_above(max(bd, 1e-9) / p))
    per_query = max((s.n_enc_layers if enc else s.n_layers) * layer_per_row_s(prob, s.tp, "encode", b_enc)
                    for s in stages) + \
        prob.mean_iters * max(s.n_layers * layer_per_row_s(prob, s.tp, "decode", b_dec) for s in stages)
    return 1 / per_query, prob.k_q * sum(s.n_layers * layer_floor_s(prob, s.tp) for s in stages)


def layout(prob: Problem, s: RRASchedule) -> Layout | None:
    """The layout of a schedule (None: it does not fit)."""
    return layout_of(prob, s.tp, s.tp_gpus)


def estimate_detail(prob: Problem, lay: Layout, s: RRASchedule) -> tuple[Terms, int]:
    """The estimate's terms at one schedule and the output length its latency is of."""
    if s.decode_iters > prob.max_decode_iters:
        raise ExeGPTError(f"decode_iters={s.decode_iters} exceeds the longest output's "
                          f"{prob.max_decode_iters} decode iterations")
    return box(prob, lay, s.encode_batch, s.encode_batch, s.decode_iters, s.decode_iters, detail=True), \
        prob.latency_len


def spaces(prob: Problem, policy, tps: list[int], space) -> list[tuple[Layout, Space]]:
    """One search space of (B_E, N_D) per TP configuration."""
    out = []
    for t in tps:
        for g in tp_gpu_counts(prob.cluster.count, t):
            lay = layout_of(prob, t, g)
            if lay is not None:
                fn = (lambda lay: lambda lo, hi: box(prob, lay, lo[:, 0], hi[:, 0], lo[:, 1], hi[:, 1]))(lay)
                pre = (lambda lay: lambda: prebound(prob, lay, space.max_encode_batch))(lay)
                out.append((lay, Space(fn, (1, 1), (space.max_encode_batch, prob.max_decode_iters), prebound=pre)))
    return out


def schedule_at(lay: Layout, point: tuple[int, ...], num_gpus: int) -> RRASchedule:
    return RRASchedule(point[0], point[1], lay.tp, lay.tp_gpus, num_gpus)


def parse(policy, fields: dict, num_gpus: int) -> RRASchedule:
    """A schedule from CLI fields (``encode_batch``, ``decode_iters``, ``tp``, ``tp_gpus``)."""
    return RRASchedule(num_gpus=num_gpus, **with_tp_defaults(fields, num_gpus))


def describe(s: RRASchedule) -> str:
    return f"RRA B_E={s.encode_batch} N_D={s.decode_iters} TP{s.tp}x{s.tp_gpus}"


stage_roles = one_pipeline_roles


def from_fields(fields: dict) -> RRASchedule:
    return RRASchedule(**fields)


# --- driver -------------------------------------------------------------------------------------------

def drivers(plan, control=None, stop: SteadyStop | None = None) -> dict:
    """The one driver of an RRA plan, on the ``main`` group. With ``control`` (``exegpt.replan.DriftControl``), each
    encode phase first shows it the requests that finished and takes the plan it holds: a re-planned B_E and N_D
    apply from that phase on, to the rows in flight too (the cache keeps its rows). With ``stop``, the run ends
    once its steady window holds what ``stop`` asks (a measurement run)."""
    rows = rra_cache_rows(plan)

    def drive(view: View):
        s, target = plan.schedule, rra_refill_target(plan)
        p = view.num_stages
        alive: list[int] = []  # the requests in cache rows, in row order
        enc: list[float] = []
        dec: list[tuple[float, int]] = []
        steady = SteadyMarker(enc, dec)
        steady_finished = 0  # requests finished inside the steady window
        while alive or view.waiting() or view.more_to_come():
            # Encode phase: free the finished rows, then refill toward the target decode batch.
            t_phase = view.now()
            if control is not None:  # between phases: the drift monitor reads what finished; a plan change applies
                now = control.between_phases(view, alive)
                s, target = now.schedule, min(rra_refill_target(now), rows)
            before = len(alive)
            alive = yield from drop_finished(view, alive)
            finished = before - len(alive)
            steady_finished += finished if steady.phases() else 0
            if stop is not None and stop.reached(steady, steady_finished):
                steady.end(t_phase)
                break
            wanted = rra_admit(s.encode_batch, finished, len(alive), target, rows)
            waiting = view.waiting()
            if len(waiting) < wanted:
                steady.end(t_phase)
            elif len(alive) + wanted >= target:
                steady.begin(t_phase)
            n = min(len(waiting), wanted)
            if n > 0:
                batch = waiting[:n]
                yield Prefill(tuple(batch), p * rra_chunks(n, s.encode_batch))
                enc.append(view.now() - t_phase)  # the phase: compaction, then the encode batch
                alive += batch
            # Decode phase: N_D iterations, one micro-batch per stage, finished rows dropped at once.
            active = [r for r in alive if not view.done(r)]
            if not active:
                if not alive and not view.waiting() and view.more_to_come():
                    yield WaitArrival()
                continue
            t = view.now()
            steps = yield Decode(tuple(tuple(mb) for mb in split_even(active, p)), s.decode_iters)
            dt = (view.now() - t) / len(steps)
            dec += [(dt, n_rows) for n_rows in steps]
        return DriverStats(tuple(enc), tuple(dec), steady.window(view.now()))

    return {MAIN: drive}


def cache_rows(plan, group: str) -> int:
    return rra_cache_rows(plan)


# --- drift: the cheap move ----------------------------------------------------------------------------

def retune_space(prob: Problem, lay: Layout, plan) -> Space:
    """What a running RRA plan can change between phases without moving weights or cache (``exegpt.replan``): B_E
    and N_D on its layout, within the cache rows it holds (``ceil(refill) + B_E``, the box's smallest)."""
    rows = rra_cache_rows(plan)

    def fn(lo, hi):
        d = box(prob, lay, lo[:, 0], hi[:, 0], lo[:, 1], hi[:, 1], detail=True)
        return d.thr, d.lat, d.ok & (np.ceil(d.refill) + lo[:, 0] <= rows)

    return Space(fn, (1, 1), (max(1, rows - 1), prob.max_decode_iters))


def retune_point(s: RRASchedule) -> tuple[int, ...]:
    """The schedule's point in ``retune_space``."""
    return s.encode_batch, s.decode_iters


def retuned(s: RRASchedule, point: tuple[int, ...]) -> RRASchedule:
    """The schedule at a point of ``retune_space``."""
    return dataclasses.replace(s, encode_batch=int(point[0]), decode_iters=int(point[1]))
