"""Request-level replay of a plan: its schedule stepped through a sample of requests, every step timed by the
cost model of its estimate.

``simulate`` estimates a schedule's steady state from expectations: the bound-length query decodes beside the
expected rows, every encode batch holds prompts of the expected lengths. A run reports the **worst** latency of
the requests that reached the bound length, and they do not see expected batches: prompts vary in length from
phase to phase, the refill admits as many queries as finished (more than B_E in some phases), rows finish at
random. With small encode batches the worst of them is well above the expectation (measured on the CPU runner:
20-27 % above the estimate at B_E = 4-8, N_D = 4-16).

A replay follows the rules the runner executes (``exegpt.rules``, shared with ``runner``) request by request, over
the same sample of lengths a run of the same seed draws (``rules.sample_lengths``). It times each encode
micro-batch at its own prompts' lengths and each decode step at its own rows and context, with the same stage
costs as the estimate (``simulate._encode_times`` / ``_decode_times``: profile lookups, TP all-reduces, hops,
the executor's own work, the rank slowdown), and reads off what a run's report reads: the steady-window
throughput and the worst and median latency to the bound length. The machine's own variance is not in it.

RRA (``runner/rra.py``), P pipeline stages:
  * encode phase: compact, admit ``rra_admit`` queries in ``rra_chunks`` chunks of P micro-batches
    (``split_even``), pipelined as a flow shop (a micro-batch enters stage s once it left stage s - 1 and stage s
    finished the one before). The driver computes the first stage as it submits, so micro-batch j starts its
    encode when stage 0 has finished micro-batch j - 1; first tokens come back (``token_return``) after the last
    submission;
  * decode phase: up to N_D iterations of the active rows in P micro-batches cut at the phase start; a row leaves
    its micro-batch when it finishes. An iteration takes the longer of the busiest stage (its micro-batches
    summed) and the slowest micro-batch's round trip (its stages and the token hop back); every row gets its token
    at the iteration's end.
WAA (``runner/waa.py``): the encode driver encodes batches of B_E in order, at most ``HANDOFF_DEPTH`` ahead of the
merges (it waits for the credit a merge sends); each batch's KV is handed off (``kv_handoff``, on the decode
driver's compute where ``Profile.handoff_on_compute``). The decode driver, whenever a batch fits its cache, waits
for the next batch and merges it, then runs one iteration of all its active rows in micro-batches of B_m.
Static (``runner/static.py``): batches of B in order, each encoded like an RRA phase, then decoded until its
longest output is done, finished rows computed on at their growing positions.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from .cost import CostModel
from .errors import ExeGPTError
from .plan import Plan
from .profile import Profile
from .rules import SteadyMarker, SteadyWindow, rra_admit, rra_cache_rows, rra_chunks, rra_refill_target, \
    sample_lengths, split_by, split_even, steady_rate, waa_cache_rows
from .schedule import RRASchedule, StaticSchedule, WAASchedule
from .simulate import HANDOFF_DEPTH, Layout, Problem, _decode_times, _encode_times, spans_ranks

DEFAULT_REQUESTS = 600
"""Requests a replay runs by default: as many as the closed loop's runs (``profiler.loop``)."""


@dataclass(frozen=True)
class Replay:
    """What a replay read off its timeline, with the names of ``runner.RunReport`` (and ``Estimate``)."""

    throughput_seq_s: float
    """Completions per second over the steady window (else between the 10 % and 90 % completions)."""
    latency_s: float
    """The worst latency to token ``latency_len`` among the requests that generated that many (NaN: none did)."""
    latency_p50_s: float
    """The median of the same latencies."""
    latency_len: int
    encode_stage_s: float
    """Mean encode phase in the steady window (the whole run without one)."""
    decode_step_s: float
    """Mean decode iteration in the steady window (the whole run without one)."""
    decode_batch: float
    """Mean rows of a decode iteration, as ``decode_step_s``."""
    makespan_s: float
    num_requests: int
    """Requests submitted."""
    num_failed: int = 0
    """Requests the runner would fail on admission, longer than the plan's KV-cache budget per sequence (its
    workload's longest prompt plus longest output); the timeline runs the others, in their order."""


def replay(plan: Plan, profile: Profile | None = None, num_requests: int = DEFAULT_REQUESTS, seed: int = 0,
           lengths=None) -> Replay:
    """Replays ``plan`` (costed with ``profile``, the profile its estimate came from; by default the built-in
    profile of its model and devices, as ``find_schedule``'s default) on ``num_requests`` requests
    drawn from ``plan.workload`` with ``seed``, the requests ``runner.run_plan(plan, num_requests=...,
    seed=...)`` runs; or on ``lengths``, (input, output) tokens per request in submission order."""
    if not isinstance(plan.schedule, (RRASchedule, WAASchedule, StaticSchedule)):
        raise ExeGPTError(f"replay covers RRA, WAA and static schedules, not {type(plan.schedule).__name__}")
    if lengths is None:
        if not isinstance(num_requests, int) or num_requests < 1:
            raise ExeGPTError(f"num_requests={num_requests!r} must be a whole number >= 1")
        lengths = sample_lengths(plan.workload, num_requests, seed)[1]
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.ndim != 2 or lengths.shape[1] != 2 or not len(lengths) or (lengths < 1).any():
        raise ExeGPTError(f"lengths must be (input, output) pairs of at least 1 token each, got shape "
                          f"{lengths.shape} with least value {lengths.min() if lengths.size else None}")
    budget = plan.workload.max_total_len
    fits = lengths.sum(axis=1) <= budget
    if not fits.any():
        raise ExeGPTError(f"every one of the {len(lengths)} requests exceeds the plan's KV-cache budget of {budget} "
                          f"tokens per sequence (its workload's longest prompt plus longest output); the shortest "
                          f"has {lengths.sum(axis=1).min()}")
    kind = {RRASchedule: _RRA, WAASchedule: _WAA, StaticSchedule: _Static}[type(plan.schedule)]
    rp = kind(_problem(plan, profile), plan, lengths[fits]).run()
    return dataclasses.replace(rp, num_requests=len(lengths), num_failed=int((~fits).sum()))


def _problem(plan: Plan, profile: Profile | None) -> tuple[Problem, Layout]:
    from .optimize import problem  # the API module resolves names

    prob = problem(plan.workload, plan.bound, model=plan.model, devices=plan.devices, profile=profile)
    if plan.schedule.num_gpus != prob.cluster.count:
        prob = prob.with_devices(plan.schedule.num_gpus)
    s = plan.schedule
    lay = Layout(s.policy, s.tp, getattr(s, "tp_gpus", 0), getattr(s, "encode_gpus", 0), getattr(s, "decode_gpus", 0),
                 plan.stages)
    return prob, lay


class _Timeline:
    """Per-request bookkeeping and step costs shared by the replays."""

    def __init__(self, pl: tuple[Problem, Layout], plan: Plan, lengths: np.ndarray):
        self.prob, self.lay = pl
        self.plan, self.inp, self.out = plan, lengths[:, 0], lengths[:, 1]
        self.gen = np.zeros(len(lengths), dtype=np.int64)  # tokens generated per request
        self.start = np.full(len(lengths), math.nan)
        self.at_len = np.full(len(lengths), math.nan)  # when the latency_len-th token came
        self.finish = np.full(len(lengths), math.nan)
        self.latency_len = plan.estimate.latency_len
        self.padded = self.prob.cost.padded
        self.padded_decode = self.prob.cost.padded_decode

    def token(self, rids, t: float) -> None:
        rids = np.asarray(rids, dtype=np.int64)
        self.gen[rids] += 1
        g = self.gen[rids]
        self.at_len[rids[g == self.latency_len]] = t
        self.finish[rids[g == self.out[rids]]] = t

    def done(self, rid: int) -> bool:
        return self.gen[rid] >= self.out[rid]

    def prompts_cost(self, rids) -> CostModel:
        """The cost model with the prompt side set to these requests' own prompts."""
        return dataclasses.replace(self.prob.cost, stats=self.prob.stats.for_prompts(self.inp[rids], self.padded))

    def encode_times(self, stages, rids) -> list[float]:
        """Seconds of each of ``stages`` to encode the prompts of ``rids`` as one batch."""
        return [float(np.ravel(x)[0]) for x in _encode_times(self.prob, stages, len(rids), self.prompts_cost(rids))[0]]

    def encode(self, rids: list[int], parts: int, t0: float) -> float:
        """Encodes ``rids`` as ``parts`` pipelined micro-batches from ``t0``; returns when the first tokens are in."""
        stages = self.lay.stages  # RRA and static: one pipeline of every stage
        p = len(stages)
        mbs = split_even(rids, parts)
        done = np.zeros(p)  # when each stage finished its latest micro-batch
        arrive = []
        for mb in mbs:
            t = self.encode_times(stages, mb)
            self.start[mb] = t0 + done[0]  # submitted when the driver's stage finished the one before
            prev = 0.0
            for s in range(p):
                done[s] = max(done[s], prev) + t[s]
                prev = done[s]
            arrive.append(prev)
        if p > 1:
            ret = float(self.prob.cost.token_return(float(max(len(mb) for mb in mbs)))[0])
            arrive = [a + ret for a in arrive]
        t_end = t0 + max(max(arrive), done[0])
        for mb in mbs:
            self.token(mb, t_end)
        return t_end

    def step(self, stages, mbs: list[list[int]], ctxs: list[np.ndarray] | None = None) -> float:
        """Seconds of one decode iteration of micro-batches ``mbs`` (non-empty lists of request ids) pipelined over
        ``stages``: the busiest stage (its micro-batches summed) or the slowest micro-batch's round trip (its
        stages and the token hop back to the driver), whichever is longer. ``ctxs``: each micro-batch's rows'
        contexts (default: prompt and tokens so far)."""
        sizes = np.array([len(mb) for mb in mbs], dtype=float)
        if ctxs is None:
            ctxs = [self.inp[mb] + self.gen[mb] for mb in mbs]
        ctx = np.array([c.max() if self.padded_decode else c.mean() for c in ctxs], dtype=float)
        per_stage, _ = _decode_times(self.prob, stages, sizes, ctx)
        t = np.stack([np.broadcast_to(x, sizes.shape) for x in per_stage])  # [stage, micro-batch]
        if len(stages) == 1:
            return float(t.sum())
        ret = np.asarray(self.prob.cost.token_return(sizes)[0], dtype=float)
        return float(max(t.sum(axis=1).max(), (t.sum(axis=0) + ret).max()))

    def report(self, enc, dec, steady: SteadyWindow | None) -> Replay:
        """What a run's report reads off (``runner.report.build_report``): ``enc`` encode seconds, ``dec`` (seconds,
        rows) per decode iteration, ``steady`` the steady window the driver marked."""
        finish = np.sort(self.finish)
        seq_s = steady_rate(finish)
        rate = steady.rate(finish, enc, dec) if steady is not None else None
        if rate is not None:
            seq_s, enc, dec = rate, enc[steady.encodes], dec[steady.decode_iters]
        lat = (self.at_len - self.start)[~np.isnan(self.at_len)]
        return Replay(
            throughput_seq_s=float(seq_s), latency_s=float(lat.max()) if lat.size else math.nan,
            latency_p50_s=float(np.median(lat)) if lat.size else math.nan, latency_len=int(self.latency_len),
            encode_stage_s=float(np.mean(enc)) if enc else math.nan,
            decode_step_s=float(np.mean([d for d, _ in dec])) if dec else math.nan,
            decode_batch=sum(r for _, r in dec) / len(dec) if dec else 0.0, makespan_s=float(finish[-1]),
            num_requests=len(self.inp))


class _RRA(_Timeline):
    """One RRA replay (the runner's ``drive_rra``, step by step)."""

    def run(self) -> Replay:
        s, n = self.plan.schedule, len(self.inp)
        target, rows = rra_refill_target(self.plan), rra_cache_rows(self.plan)
        stages = self.lay.stages
        p = len(stages)
        queue, alive, t = 0, [], 0.0  # queue: the next request id to admit
        enc, dec = [], []  # encode phase seconds; (seconds, rows) per decode iteration
        steady = SteadyMarker(enc, dec)
        while queue < n or alive:
            t_phase = t
            keep = [r for r in alive if not self.done(r)]
            finished, alive = len(alive) - len(keep), keep
            wanted = rra_admit(s.encode_batch, finished, len(alive), target, rows)
            if n - queue < wanted:
                steady.end(t_phase)
            elif len(alive) + wanted >= target:
                steady.begin(t_phase)
            k = min(n - queue, wanted)
            if k > 0:
                batch = list(range(queue, queue + k))
                queue += k
                t = self.encode(batch, p * rra_chunks(k, s.encode_batch), t)
                enc.append(t - t_phase)
                alive += batch
            active = [r for r in alive if not self.done(r)]
            if not active:
                continue
            mbs = split_even(active, p)
            for _ in range(s.decode_iters):
                mbs = [[r for r in mb if not self.done(r)] for mb in mbs]
                mbs = [mb for mb in mbs if mb]
                if not mbs:
                    break
                dt = self.step(stages, mbs)
                t += dt
                dec.append((dt, sum(len(mb) for mb in mbs)))
                for mb in mbs:
                    self.token(mb, t)
        return self.report(enc, dec, steady.window(t))


class _WAA(_Timeline):
    """One WAA replay: the encode driver (``runner.waa.drive_encode``) and the decode driver (``drive_decode``), each
    on its own clock, meeting at the hand-offs and the credits. As in the estimate (``simulate.concurrent_times``),
    a one-rank group computes ``Profile.concurrency`` times slower while the other group computes too, and every
    computed term carries the profile's lockstep factor (``waa_period_factor``)."""

    def run(self) -> Replay:
        s, n, prob = self.plan.schedule, len(self.inp), self.prob
        enc_st, dec_st = self.lay.group("encode"), self.lay.group("decode")
        rows = waa_cache_rows(self.plan)
        batches = split_by(list(range(n)), s.encode_batch)
        extra = prob.concurrency - 1.0  # while both groups compute
        extra_e, extra_d = (0.0 if spans_ranks(g) else extra for g in (enc_st, dec_st))
        coupling, on_compute = prob.profile.waa_period_factor, prob.profile.handoff_on_compute
        free = np.zeros(len(enc_st))  # when each encode stage finished its latest batch
        busy: list[tuple[float, float]] = []  # the encode driver's compute intervals
        out: list[tuple[float, float, float]] = []  # per batch: encode start, first tokens, hand-off seconds
        merged: list[float] = []  # when the decode driver merged each batch (and sent its credit)
        last_dec = 0.0  # the decode driver's latest iteration (seconds)

        def encode_ahead() -> None:
            """Every batch the encoder can have started: at most HANDOFF_DEPTH ahead of the merges."""
            while len(out) < min(len(batches), len(merged) + HANDOFF_DEPTH):
                k = len(out)
                rids = batches[k]
                t = [x * coupling for x in self.encode_times(enc_st, rids)]
                t[0] += extra_e * min(t[0], last_dec)  # the decode group computing meanwhile
                t0 = max(free[0], merged[k - HANDOFF_DEPTH] if k >= HANDOFF_DEPTH else 0.0)
                self.start[rids] = t0
                prev = t0
                for i, ti in enumerate(t):
                    free[i] = max(free[i], prev) + ti
                    prev = free[i]
                busy.append((t0, free[0]))
                self.token(rids, prev)  # the prefill's token
                out.append((t0, prev, float(np.ravel(self.prompts_cost(rids).kv_handoff(len(rids))[0])[0])))

        def encoding_during(a: float, b: float) -> float:
            return sum(max(0.0, min(b, e) - max(a, s0)) for s0, e in busy[-HANDOFF_DEPTH - 1:])

        alive, td, held, k_next = [], 0.0, None, 0
        enc, dec = [], []
        steady = SteadyMarker(enc, dec)
        while True:
            alive = [r for r in alive if not self.done(r)]
            encode_ahead()
            if held is None and len(alive) + s.encode_batch <= rows:
                if k_next < len(batches):  # wait for the next batch's metadata (and, off compute, its KV)
                    held, k_next = k_next, k_next + 1
                    _, first, hand = out[held]
                    td = max(td, first + (0.0 if on_compute else hand))
                else:
                    steady.end(td)  # the encoder's end message
            if held is not None and len(alive) + len(batches[held]) <= rows:
                t0, first, hand = out[held]
                if on_compute:
                    td += hand * coupling  # the decode driver imports the batch's KV between iterations
                merged.append(td)
                enc.append(first - t0)
                alive += batches[held]
                held = None
                encode_ahead()
            active = [r for r in alive if not self.done(r)]
            if not active:
                if k_next == len(batches) and held is None:
                    break
                continue
            if len(active) >= self.plan.estimate.decode_batch:
                steady.begin(td)
            dt = self.step(dec_st, split_by(active, s.micro_batch)) * coupling
            dt += extra_d * encoding_during(td, td + dt)  # the encode group computing meanwhile
            last_dec = dt
            td += dt
            dec.append((dt, len(active)))
            self.token(active, td)
        return self.report(enc, dec, steady.window(td))


class _Static(_Timeline):
    """One static-batching replay (``runner.static.drive_static``): batches of B in order, each encoded, then decoded
    until its longest output is done, finished rows computed on (no early termination, no refill)."""

    def run(self) -> Replay:
        stages = self.lay.stages
        p, t, enc, dec = len(stages), 0.0, [], []
        for batch in split_by(list(range(len(self.inp))), self.plan.schedule.batch):
            t0 = t
            t = self.encode(batch, p, t)
            enc.append(t - t0)
            mbs = split_even(batch, p)
            for u in range(int(self.out[batch].max()) - 1):
                live = [r for r in batch if not self.done(r)]
                if not live:
                    break
                dt = self.step(stages, mbs, [self.inp[mb] + 1 + u for mb in mbs])  # every row one token on
                t += dt
                dec.append((dt, len(batch)))
                self.token(live, t)
        return self.report(enc, dec, None)  # no steady window: every batch runs alone, start to end
