"""RRA executor: all ranks pipeline all layers; encode a batch, then N_D decode iterations, refill, repeat.

Rules shared with ``exegpt``'s simulator (keep them in step):
- the decode batch is split into one micro-batch per pipeline stage (fixed rule, paper §11.1);
- at each encode phase, ``n = min(queue, target - alive, max(B_E, finished))`` queries are admitted, where
  ``target = round(estimate.refill_batch)``, ``finished`` is the rows that finished since the last phase, and
  the cache holds ``ceil(refill_batch) + encode_batch`` rows: as many as finished (the paper's refill), so the
  decode batch is back at the target after every phase, and B_E a phase while it ramps up at the start. The
  admitted prompts are split into ``ceil(n / B_E)`` chunks of one micro-batch per stage each, all pipelined: a
  micro-batch never holds more than B_E / P prompts, the activation memory the plan was sized for. (Admitting
  at most B_E a phase left the batch short after every phase in which more than B_E finished: measured, the
  decode batch ran at 0.92-0.96x the refill target at small N_D.);
- the prefill's token is the first output token; finished rows leave the decode batch at once (early
  termination) and are compacted out of the KV cache at the next encode phase;
- the phases alternate: every micro-batch finishes its N_D iterations (or runs out of rows) before the
  next encode phase.
"""

from __future__ import annotations

from collections import deque

import torch

from exegpt.rules import SteadyMarker, SteadyWindow, rra_admit, rra_cache_rows as cache_rows, rra_chunks, \
    rra_refill_target as refill_target, split_even

from .kv_cache import fill_holes
from .pipeline import COMPACT, Command, Pipeline, RunContext, _i64, encode, run_decode, run_main_pipeline
from .report import RunReport
from .requests import RequestTracker


def run_rra(ctx: RunContext, rank: int, world_size: int, device: torch.device) -> RunReport | None:
    """This rank's part of an RRA run; the driver (rank 0) returns the report."""
    plan, rows = ctx.plan, cache_rows(ctx.plan)
    stages = len(ctx.stages_of("main"))
    return run_main_pipeline(ctx, rank, world_size, device, rows, "rra",
                             lambda pipe, tracker, clock: drive_rra(pipe, tracker, plan, stages, rows, clock))


def drive_rra(pipe: Pipeline, tracker: RequestTracker, plan, num_stages: int, rows: int, clock
              ) -> tuple[list[float], list[tuple[float, int]], SteadyWindow | None]:
    """The RRA loop on the driver. Returns (encode phase seconds, (seconds, rows) per decode iteration, the
    steady window: from the first phase whose refill reached the target until the queue could not fill one)."""
    queue = deque(r.id for r in tracker.runnable)
    alive: list[int] = []  # request of each cache row; row i holds alive[i]
    target = refill_target(plan)
    enc_s: list[float] = []
    dec: list[tuple[float, int]] = []
    steady = SteadyMarker(enc_s, dec)
    while queue or alive:
        # Encode phase: compact out finished rows, then refill toward the target decode batch.
        t_phase = clock()
        keep = fill_holes([i for i, rid in enumerate(alive) if not tracker.done(rid)])
        finished = len(alive) - len(keep)
        if finished:
            pipe.submit(Command(COMPACT, _i64(keep)))
            alive = [alive[i] for i in keep]
        wanted = rra_admit(plan.schedule.encode_batch, finished, len(alive), target, rows)
        if len(queue) < wanted:
            steady.end(t_phase)
        elif len(alive) + wanted >= target:
            steady.begin(t_phase)
        n = min(len(queue), wanted)
        if n > 0:
            batch = [queue.popleft() for _ in range(n)]
            chunks = rra_chunks(n, plan.schedule.encode_batch)
            encode(pipe, tracker, batch, len(alive), num_stages * chunks, clock)
            enc_s.append(clock() - t_phase)  # the phase: compaction, then the encode batch
            alive += batch
        # Decode phase: N_D iterations, one micro-batch per stage, finished rows dropped at once.
        active = [i for i, rid in enumerate(alive) if not tracker.done(rid)]
        if not active:
            continue
        t = clock()
        steps = run_decode(pipe, tracker, split_even(active, num_stages), alive, clock,
                           plan.schedule.decode_iters)
        dt = (clock() - t) / len(steps)
        dec += [(dt, s) for s in steps]
    return enc_s, dec, steady.window(clock())
