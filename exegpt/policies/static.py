"""Static batching (FasterTransformer), the paper's baseline: a batch of B is prefilled, then decoded until its
longest output is done; finished rows are computed on (no early termination, no refill). With P stages the batch
runs as one micro-batch per stage, pipelined, as in RRA. TP within a node, pipeline stages across nodes.

The estimate: Static (FasterTransformer, the paper's baseline): a batch of B runs E[max k] decode iterations with
no early termination; its bound applies to the longest output (paper §7.1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ExeGPTError
from ..problem import Problem
from ..rules import split_even
from ..schedule import Policy, check_tp, one_pipeline_roles
from ..stages import Layout, Terms, fits, pipeline_phases, place_stages, stage_memory
from .base import MAIN, Compact, Decode, DriverStats, Prefill, View, WaitArrival

NAMES = (Policy.STATIC,)
ENCODER_DECODER = True
"""Its driver runs encoder-decoder models on the runner: whole prompts only (no chunks, no recomputation)."""


@dataclass(frozen=True, slots=True)
class StaticSchedule:
    """FasterTransformer-style static batching: a batch is encoded, then decoded until its longest
    query finishes; no early termination, no refill. TP within a node, pipeline across nodes."""

    batch: int
    tp: int
    num_gpus: int
    policy: Policy = Policy.STATIC

    def __post_init__(self):
        if self.batch < 1:
            raise ExeGPTError(f"static: batch={self.batch} must be >= 1")
        check_tp(self.tp, self.num_gpus if self.tp > 1 else 0, self.num_gpus, "static")
        if self.num_gpus % self.tp:
            raise ExeGPTError(f"static: tp={self.tp} must divide num_gpus={self.num_gpus}")

    @property
    def stages(self) -> tuple[int, ...]:
        return (self.tp,) * (self.num_gpus // self.tp)


def layout_of(prob: Problem, tp: int) -> Layout | None:
    n = prob.cluster.count
    stages = place_stages(prob, (tp,) * (n // tp), "both")
    return None if stages is None else Layout(Policy.STATIC, tp, n if tp > 1 else 0, n, n, stages)


def baseline_layout(prob: Problem) -> Layout:
    """FasterTransformer's layout in the paper's evaluation: the largest TP degree inside a node, pipeline
    stages across nodes."""
    n, node = prob.cluster.count, prob.cluster.device.node_size
    tps = [t for t in prob.profile.tp_degrees() if t <= node and n % t == 0 and prob.model.valid_tp(t)
           and prob.profile.supports_tp(t)]
    if not tps:
        raise ExeGPTError(f"no TP degree of the profile divides {n} devices")
    lay = layout_of(prob, max(tps))
    if lay is None:
        raise ExeGPTError(f"{prob.model.name} does not fit on {prob.cluster.label} with static batching")
    return lay


def points(prob: Problem, lay: Layout, batch, detail: bool = False):
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
        e, d, ok = pipeline_phases(prob, stages, b[i:i + 1], b[i:i + 1], ctx=float(c))
        t_enc[i], t_dec[i], ok_d[i] = np.ravel(e)[0], np.ravel(d)[0], np.ravel(ok)[0]
    thr = b / (t_enc + iters * t_dec)
    k_max = prob.workload.output_len.max - shift
    lat = t_enc + k_max * t_dec
    mem = stage_memory(prob, stages, b, b / p * st.in_max)
    ok = ok_d & fits(prob, mem)
    if detail:
        return Terms(thr, lat, ok, t_enc, t_dec, b, mem)
    return thr, lat, ok


def layout(prob: Problem, s: StaticSchedule) -> Layout | None:
    return layout_of(prob, s.tp)


def estimate_detail(prob: Problem, lay: Layout, s: StaticSchedule) -> tuple[Terms, int]:
    """The estimate's terms at one schedule and the output length its latency is of (the longest)."""
    return points(prob, lay, s.batch, detail=True), prob.workload.output_len.max


def spaces(prob: Problem, policy, tps: list[int], space) -> list:
    raise ExeGPTError("static batching is the baseline: use static_schedule(), not policies=('static',)")


def parse(policy, fields: dict, num_gpus: int) -> StaticSchedule:
    """A schedule from CLI fields (``batch``, ``tp``)."""
    fields.setdefault("tp", 1)
    return StaticSchedule(num_gpus=num_gpus, **fields)


def describe(s: StaticSchedule) -> str:
    return f"static B={s.batch} TP{s.tp}"


stage_roles = one_pipeline_roles


def from_fields(fields: dict) -> StaticSchedule:
    return StaticSchedule(**fields)


# --- driver -------------------------------------------------------------------------------------------

def drivers(plan) -> dict:
    """The one driver of a static plan, on the ``main`` group."""
    size = plan.schedule.batch

    def drive(view: View):
        p = view.num_stages
        enc: list[float] = []
        dec: list[tuple[float, int]] = []
        used = False
        while view.waiting() or view.more_to_come():
            waiting = view.waiting()
            if not waiting:
                yield WaitArrival()
                continue
            if used:
                yield Compact()  # the previous batch is done: every row is free
            batch = waiting[:size]
            t = view.now()
            yield Prefill(tuple(batch), p)
            enc.append(view.now() - t)
            used = True
            if all(view.done(r) for r in batch):
                continue
            t = view.now()
            steps = yield Decode(tuple(tuple(mb) for mb in split_even(batch, p)), view.max_len,
                                 drop_finished=False)
            dt = (view.now() - t) / len(steps)
            dec += [(dt, n_rows) for n_rows in steps]
        return DriverStats(tuple(enc), tuple(dec), None)  # no steady window: every batch runs alone

    return {MAIN: drive}


def cache_rows(plan, group: str) -> int:
    return plan.schedule.batch
