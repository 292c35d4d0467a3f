"""Static batching (FasterTransformer), the paper's baseline: a batch of B is prefilled, then decoded until its
longest output is done; finished rows are computed on (no early termination, no refill). With P stages the batch
runs as one micro-batch per stage, pipelined, as in RRA."""

from __future__ import annotations

from ..rules import split_even
from .base import MAIN, Compact, Decode, DriverStats, Prefill, View, WaitArrival


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


def stage_roles(schedule) -> tuple[tuple[str, int], ...]:
    """(role, TP degree) of each stage the schedule implies, in plan order."""
    return tuple(("both", t) for t in schedule.stages)
