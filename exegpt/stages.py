"""Device layouts and stage-group costs, shared by every policy's estimate and by the simulated engine.

The ExeGPT simulator: steady-state throughput and bound-length latency of RRA, WAA-C/M and static.

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
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from .cost import CostModel
from .memory import activation_bytes, kv_bytes, stage_weight_bytes, stage_weights
from .placement import place_layers
from .problem import Problem
from .profile import Kernel
from .schedule import Policy

_REF_ROWS = 8.0  # rows at which per-layer times are compared to balance the layer placement


@dataclass(frozen=True, slots=True)
class Stage:
    """One pipeline stage: ``tp`` devices holding decoder layers [first_layer, first_layer + n_layers)
    (and, for encoder-decoder models, encoder layers [first_enc_layer, first_enc_layer + n_enc_layers))."""

    role: str
    """'both' (RRA, static), 'encode' or 'decode' (WAA)."""
    tp: int
    first_layer: int
    n_layers: int
    first_enc_layer: int = 0
    n_enc_layers: int = 0
    sp: int = 1
    """Shift Parallelism: the SP degree of the stage's base configuration (SP, tp / SP); a step runs either in it
    (Ulysses) or as TP over all ``tp`` devices, each device holding both weight shards (1: TP only)."""


@dataclass(frozen=True, eq=False)
class Terms:
    """The terms of a policy's estimate at a set of points (each an array over the points): what ``box(...,
    detail=True)`` returns and ``simulate.estimate`` reads."""

    thr: np.ndarray
    """Throughput (sequences/s)."""
    lat: np.ndarray
    """Latency of the bound-length output (s)."""
    ok: np.ndarray
    """Fits in memory and in the profiled range."""
    t_enc: np.ndarray
    """Encode phase (RRA, static) or encode interval (WAA), s."""
    t_dec: np.ndarray
    """Decode iteration of the whole decode batch, s."""
    bd: np.ndarray
    """Mean rows of a decode iteration."""
    mem: list
    """Peak bytes per stage device."""
    refill: np.ndarray | None = None
    """RRA: the batch refilled at a phase start (else ``bd``)."""
    kv_tokens: float = float("inf")
    """Paged policies: the KV tokens the memory holds (``Estimate.kv_tokens``)."""
    extra: dict = field(default_factory=dict)
    """Policy-specific terms (RRA: ``rows_q``, ``t_dec_q``; WAA: ``period``)."""


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


def _layer_s(prob: Problem, tp: int, role: str) -> float:
    """Seconds of one layer at TP degree ``tp``, the per-layer time placements balance (memoised)."""
    key = ("layer_s", tp, role)
    if key not in prob.memo:
        cost = prob.cost
        prob.memo[key] = float((cost.encode_layer(tp, 1.0) if role == "encode" else
                                cost.decode_layer(tp, _REF_ROWS))[0])
    return prob.memo[key]


def _place(prob: Problem, degrees: tuple[int, ...], role: str, n_layers: int, encoder: bool) -> tuple[int, ...] | None:
    """Layers per stage for one group of stages, balanced on per-layer time (``placement``)."""
    if not all(prob.profile.supports_tp(t) for t in set(degrees)):
        return None
    model, last = prob.model, len(degrees) - 1
    key = ("place_terms", encoder)
    if key not in prob.memo:  # what the placement weighs per TP degree (and per end of the pipeline)
        prob.memo[key] = ({}, float(prob.profile.seconds(Kernel.LM_HEAD, 1, _REF_ROWS)))
    per, head = prob.memo[key]
    for t in set(degrees):
        if t not in per:
            per[t] = (model.encoder_layer_bytes(t) if encoder else model.layer_bytes(t),
                      {(f, l): stage_weight_bytes(model, t, 0, 0, f, l) for f in (False, True) for l in (False, True)})
    fixed_s = [head if (s == last and not encoder) else 0.0 for s in range(len(degrees))]
    per_bytes = [per[t][0] for t in degrees]
    fixed_bytes = [per[t][1][s == 0, s == last] for s, t in enumerate(degrees)]
    return place_layers(n_layers, [_layer_s(prob, t, role) for t in degrees], fixed_s, per_bytes, fixed_bytes,
                        prob.capacity_bytes)


def place_stages(prob: Problem, degrees: tuple[int, ...], role: str) -> tuple[Stage, ...] | None:
    """The stages of one group of TP ``degrees`` in ``role``, their layers placed (None: the weights do not fit);
    memoised on the problem, whose device count they do not depend on."""
    key = ("stages", tuple(degrees), role)
    if key not in prob.memo:
        prob.memo[key] = _stages(prob, tuple(degrees), role)
    return prob.memo[key]


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


def tp_gpu_counts(n: int, t: int) -> list[int]:
    """Devices using TP at degree t: none (t = 1), else every multiple of t up to n."""
    return [0] if t == 1 else list(range(t, n + 1, t))


# --- stage-group times ----------------------------------------------------------------------------

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


def group_cost(prob: Problem, stages: tuple[Stage, ...], cost: CostModel | None) -> CostModel:
    """The cost model of one group of stages: with ``prob.slowdown`` where it ``spans_ranks``."""
    cost = cost or prob.cost
    if prob.slowdown == 1.0 or not spans_ranks(stages):
        return cost
    return dataclasses.replace(cost, slowdown=prob.slowdown)


_SHARED_MAX_POINTS = 64  # batches of at most this many points are shared between layouts (``_shared``)
_SHARED_MAX_ENTRIES = 200_000  # and the shared costs are dropped when they grow past this many


def _shared(prob: Problem, given: CostModel | None, cost: CostModel, kind: tuple, batch, compute):
    """``compute()``, the cost of one kind of stage at ``batch``, computed once per problem: the search bounds
    thousands of layouts of the same few kinds of stage at the same few small batches (a box's corners). Only the
    problem's own cost models are shared (the simulated engine's per-batch ones are not), and only scalars and small
    batches."""
    if isinstance(batch, (float, int, np.number)):  # a scalar (a grid point's estimate)
        arr = np.asarray(batch)
    elif isinstance(batch, np.ndarray) and batch.size <= _SHARED_MAX_POINTS:
        arr = batch
    else:
        return compute()
    if not (given is None or given is prob.cost or given is prob.bound_cost):
        return compute()
    memo = prob.memo.setdefault("stage_costs", {})
    if len(memo) > _SHARED_MAX_ENTRIES:
        memo.clear()
    key = (kind, given is prob.bound_cost, cost.slowdown, type(batch), arr.dtype.str, arr.shape, arr.tobytes())
    if key not in memo:
        out = compute()
        for a in out:
            if isinstance(a, np.ndarray):
                a.flags.writeable = False  # shared: a caller that changed it in place would change every layout
        memo[key] = out
    return memo[key]


def encode_times(prob: Problem, stages: tuple[Stage, ...], batch, cost: CostModel | None = None,
                 base: bool = False):
    """Per-stage encode seconds (a list of arrays) and the combined in-range mask (``base``: Shift Parallelism's
    stages in their base (SP) mode; else TP)."""
    given, cost = cost, group_cost(prob, stages, cost)
    memo = {}  # stages repeat (48 devices are a handful of distinct stages): compute each kind once
    times, ok = [], True
    for i, s in enumerate(stages):
        key = (s.tp, s.n_layers, s.n_enc_layers, i == len(stages) - 1, i == 0, s.sp if base else 1)
        if key not in memo:
            memo[key] = _shared(prob, given, cost, ("encode",) + key, batch, lambda key=key: cost.stage_encode(
                *key[:4], batch, first=key[4], sp=key[5]))
        t, o = memo[key]
        times.append(t)
        ok = ok & o
    return times, ok


def decode_times(prob: Problem, stages: tuple[Stage, ...], rows, ctx: float | None = None,
                 cost: CostModel | None = None, base: bool = False):
    """Per-stage seconds of one decode step (``base``: as in ``encode_times``)."""
    given, cost = cost, group_cost(prob, stages, cost)
    memo = {}
    times, ok = [], True
    for i, s in enumerate(stages):
        key = (s.tp, s.n_layers, i == len(stages) - 1, i == 0, s.sp if base else 1)
        if key not in memo:
            compute = (lambda key=key: cost.stage_decode(*key[:3], rows, ctx, first=key[3], sp=key[4]))
            memo[key] = compute() if not (ctx is None or isinstance(ctx, float)) else \
                _shared(prob, given, cost, ("decode", ctx) + key, rows, compute)
        t, o = memo[key]
        times.append(t)
        ok = ok & o
    return times, ok


def stage_memory(prob: Problem, stages: tuple[Stage, ...], rows, encode_tokens, kv_rows_in_flight=None,
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
        w = stage_weights(m, s, i == 0, i == len(stages) - 1)
        kv = kv_bytes(m, s.tp, s.n_layers, rows, max_ctx, st.in_max)
        prompt_kv = m.kv_bytes_per_token(s.tp) * s.n_layers * st.in_max  # one prompt's KV, at its longest
        if kv_rows_in_flight is not None:  # WAA encode stage: prompts' KV until handed off
            kv = prompt_kv * np.asarray(kv_rows_in_flight, float)
        kv = kv + prompt_kv * np.asarray(recv_rows, float)
        memo[key] = w + kv + activation_bytes(m, s.tp, encode_tokens)
        out.append(memo[key])
    return out


def rows_fit(prob: Problem, stages: tuple[Stage, ...]) -> float:
    """The most cache rows every stage of the group can hold beside its weights (activations aside): a bound on
    the rows any schedule of the group that fits decodes at once (memoised)."""
    key = ("rows_fit", stages)
    if key not in prob.memo:
        w = stage_memory(prob, stages, 0.0, 0.0)
        row = [a - b for a, b in zip(stage_memory(prob, stages, 1.0, 0.0), w)]
        prob.memo[key] = float(min((prob.capacity_bytes - a) / b if b > 0 else np.inf for a, b in zip(w, row)))
    return prob.memo[key]


def grid_above(x):
    """The least power of 2^(1/4) at or above ``x``: a bound's batch rounded up, so that the layouts it is taken
    for share their stage costs (``_shared``) at the price of a looser (never an unsound) per-row cost."""
    return 2.0 ** (np.ceil(4 * np.log2(np.maximum(np.asarray(x, float), 1e-9))) / 4)


def layer_per_row_s(prob: Problem, tp: int, role: str, rows: float) -> float:
    """A lower bound on the seconds per row of one layer at TP degree ``tp`` in a batch of at most ``rows`` rows
    (prompts for ``role`` 'encode'): the batching envelope's per-row cost at ``rows``, which never grows with the
    batch, times the least rank slowdown (memoised; pass ``rows`` through ``grid_above`` to share it)."""
    key = ("per_row", tp, role, float(rows), prob.slowdown)
    if key not in prob.memo:
        c, r = prob.bound_cost, np.array([float(rows)])
        t = c.encode_layer(tp, r)[0] if role == "encode" else c.decode_layer(tp, r)[0]
        prob.memo[key] = float(t[0]) / float(rows) * min(1.0, prob.slowdown)
    return prob.memo[key]


def layer_floor_s(prob: Problem, tp: int) -> float:
    """A lower bound on the seconds of one decode step of one layer at TP degree ``tp``, however few its rows
    (costs never fall as rows grow; memoised)."""
    key = ("floor", tp, prob.slowdown)
    if key not in prob.memo:
        prob.memo[key] = float(prob.cost.decode_layer(tp, np.full(1, 1e-9))[0][0]) * min(1.0, prob.slowdown)
    return prob.memo[key]


def max_decode_rows(prob: Problem, stages: tuple[Stage, ...]) -> float:
    """The most rows one decode step of a stage of the group may compute within the profiled range."""
    return min(prob.profile.max_coord(k, s.tp, 0) for s in stages for k in (Kernel.DENSE_DECODE, Kernel.ATTN_DECODE)
               if prob.profile.has(k, s.tp))


def fits(prob: Problem, mem: list) -> np.ndarray:
    ok = True
    for m in mem:
        ok = ok & (m <= prob.capacity_bytes)
    return ok


def pipeline_decode(prob: Problem, stages, bd, cost: CostModel | None = None, ctx: float | None = None):
    """RRA decode-iteration seconds for B_D = bd (one micro-batch per stage) at context ``ctx`` (default: the steady
    batch's), its in-range mask and the token hop back to the driver (0 with one stage)."""
    p = len(stages)
    dec, ok_d = decode_times(prob, stages, bd / p, ctx, cost)
    if p == 1:
        return dec[0], ok_d, 0.0
    # A micro-batch's next iteration needs its tokens back at the driver: with P micro-batches over P stages the
    # pipeline has no slack, so one round trip (every stage, then the token hop) bounds the iteration too.
    ret, ok_r = (cost or prob.cost).token_return(bd / p)
    return np.maximum(p * np.maximum.reduce(dec), sum(dec) + ret), ok_d & ok_r, ret


def pipeline_phases(prob: Problem, stages, be, bd, cost: CostModel | None = None, ctx: float | None = None):
    """RRA (and static) encode-phase and decode-iteration seconds for B_E = be and B_D = bd (one micro-batch per
    stage)."""
    p = len(stages)
    enc, ok_e = encode_times(prob, stages, be / p, cost)
    t_dec, ok_d, ret = pipeline_decode(prob, stages, bd, cost, ctx)
    if p == 1:
        return enc[0], t_dec, ok_e & ok_d
    return sum(enc) + (p - 1) * np.maximum.reduce(enc) + ret, t_dec, ok_e & ok_d
