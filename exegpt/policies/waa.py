"""WAA (Workload-Aware Allocation, -C by compute, -M by memory): an encode pipeline and a decode pipeline on
disjoint devices, running at once.

The encode driver prefills batches of up to B_E waiting requests and hands each one's KV to the decode group,
at most ``HANDOFF_DEPTH`` batches ahead of the decode driver's merges (it waits for a credit). The decode driver,
whenever its cache has room for a batch and a request has arrived that it has not merged, waits for the next batch
and merges it (one batch per decode iteration, the paper's period max(encode, decode)); then it runs one decode
iteration of every active row in micro-batches of B_m rows. The prefill's token is the first output token.
"""

from __future__ import annotations

from ..rules import SteadyMarker, split_by, waa_cache_rows
from .base import DECODE, ENCODE, AwaitCredit, Compact, Decode, DriverStats, EndHandOffs, Merge, Prefill, View, \
    WaitArrival

HANDOFF_DEPTH = 2
"""Encoded batches in flight between the groups. The encoder runs at most this many batches ahead of the
decoder's merges (it keeps their KV until sent), and the decode ranks keep as many hand-off receives posted, each
into its own buffer, so that a batch's messages flow while the decoder computes (the built-in runner)."""


def drivers(plan) -> dict:
    """The encode driver and the decode driver of a WAA plan."""
    s = plan.schedule
    rows = waa_cache_rows(plan)

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
            yield Prefill(tuple(waiting[:s.encode_batch]), 1)
            sent += 1
        yield EndHandOffs()
        for _ in range(sent - credits):
            yield AwaitCredit()
        return None

    def decode(view: View):
        alive: list[int] = []  # the requests in cache rows, in row order
        enc: list[float] = []
        dec: list[tuple[float, int]] = []
        steady = SteadyMarker(enc, dec)
        merged, ended = 0, False
        while True:
            keep = [r for r in alive if not view.done(r)]
            if len(keep) < len(alive):
                yield Compact()
                alive = keep
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
            steps = yield Decode(tuple(tuple(mb) for mb in split_by(active, s.micro_batch)), 1)
            dec.append((view.now() - t, steps[0]))
        return DriverStats(tuple(enc), tuple(dec), steady.window(view.now()))

    return {ENCODE: encode, DECODE: decode}


def cache_rows(plan, group: str) -> int:
    return waa_cache_rows(plan) if group == DECODE else plan.schedule.encode_batch


def stage_roles(schedule) -> tuple[tuple[str, int], ...]:
    """(role, TP degree) of each stage the schedule implies, in plan order: encode stages, then decode stages."""
    return tuple(("encode", t) for t in schedule.encode_stages) + tuple(("decode", t) for t in schedule.decode_stages)
