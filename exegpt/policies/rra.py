"""RRA (Round-Robin Allocation): every device pipelines every layer; encode phases and decode phases alternate.

The driver: at each encode phase, free the rows of finished requests and admit ``rra_admit`` of the waiting
requests (as many as finished since the last phase, at least B_E, never past the refill target nor the cache's
rows), prefilled in ``rra_chunks`` chunks of one micro-batch per stage; then up to N_D decode iterations of the
active rows in one micro-batch per stage (paper §11.1), finished rows leaving at once. With nothing to decode and
nothing waiting, it waits for the next arrival.
"""

from __future__ import annotations

from ..rules import SteadyMarker, rra_admit, rra_cache_rows, rra_chunks, rra_refill_target, split_even
from .base import MAIN, Compact, Decode, DriverStats, Prefill, View, WaitArrival


def drivers(plan) -> dict:
    """The one driver of an RRA plan, on the ``main`` group."""
    s = plan.schedule
    target, rows = rra_refill_target(plan), rra_cache_rows(plan)

    def drive(view: View):
        p = view.num_stages
        alive: list[int] = []  # the requests in cache rows, in row order
        enc: list[float] = []
        dec: list[tuple[float, int]] = []
        steady = SteadyMarker(enc, dec)
        while alive or view.waiting() or view.more_to_come():
            # Encode phase: free the finished rows, then refill toward the target decode batch.
            t_phase = view.now()
            keep = [r for r in alive if not view.done(r)]
            finished = len(alive) - len(keep)
            if finished:
                yield Compact()
                alive = keep
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


def stage_roles(schedule) -> tuple[tuple[str, int], ...]:
    """(role, TP degree) of each stage the schedule implies, in plan order."""
    return tuple(("both", t) for t in schedule.stages)
