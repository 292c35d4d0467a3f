"""FasterTransformer-style static batching, the paper's baseline.

Encode a batch of ``batch`` queries, decode until the longest of them finishes, then take the next batch.
Finished rows keep occupying (and being computed in) the batch: no early termination, no refill. With P
stages the batch is split into one micro-batch per stage, pipelined, as in RRA. A finished row stops being
computed only when it would run past its KV-cache row (a guard for trace requests, documented).
"""

from __future__ import annotations

from collections import deque

import torch

from .pipeline import Pipeline, RunContext, encode, run_decode, run_main_pipeline, split_even
from .report import RunReport
from .requests import RequestTracker


def run_static(ctx: RunContext, rank: int, world_size: int, device: torch.device) -> RunReport | None:
    """This rank's part of a static-batching run; the driver (rank 0) returns the report."""
    rows, stages = ctx.plan.schedule.batch, len(ctx.stages_of("main"))
    return run_main_pipeline(ctx, rank, world_size, device, rows, "static",
                             lambda pipe, tracker, clock: drive_static(pipe, tracker, rows, stages, ctx.cache_len,
                                                                       clock))


def drive_static(pipe: Pipeline, tracker: RequestTracker, batch_size: int, num_stages: int, max_len: int, clock
                 ) -> tuple[list[float], list[tuple[float, int]], None]:
    """The static-batching loop on the driver. Returns (encode seconds, (seconds, rows) per decode iteration,
    no steady window: every batch runs alone, start to end)."""
    queue = deque(r.id for r in tracker.runnable)
    enc_s: list[float] = []
    dec: list[tuple[float, int]] = []
    while queue:
        batch = [queue.popleft() for _ in range(min(batch_size, len(queue)))]
        t = clock()
        encode(pipe, tracker, batch, 0, num_stages, clock)
        enc_s.append(clock() - t)
        pos = [tracker.requests[r].input_len for r in batch]
        rows = [i for i, rid in enumerate(batch) if not tracker.done(rid)]
        if not rows:
            continue
        longest = max(tracker.requests[r].output_len for r in batch)
        t = clock()
        steps = run_decode(pipe, tracker, split_even(list(range(len(batch))), num_stages), batch, clock,
                           longest - 1, drop_finished=False, row_pos=pos, max_len=max_len)
        dt = (clock() - t) / len(steps)
        dec += [(dt, s) for s in steps]
    return enc_s, dec, None
