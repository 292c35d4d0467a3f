"""The messages of PipeInfer's executor (``runner.pipeinfer``, ``runner.spec_head``): their tags and header
words, and the emulated slow link's wait."""

from __future__ import annotations

import time

TAG_RUN, TAG_HIDDEN, TAG_RESULT, TAG_CANCEL, TAG_DRAFT_REQ, TAG_DRAFT, TAG_STATS = 21, 22, 23, 24, 25, 26, 27
RUN_HDR = 6  # kind (0 run, 1 stop), run id, start, tokens, outputs wanted, send ns
STAGE_STATS = 11
"""A stage's counts: runs computed, runs skipped, runs aborted mid-way, KV positions rolled back, layers computed,
layers a cancellation saved; then the sums of its decode runs' (tokens b, seconds t): n, Σb, Σt, Σb², Σbt."""
STOP = 1


def wait_until(ns: int) -> None:
    """Sleeps until ``perf_counter_ns`` reaches ``ns`` (a hop's emulated delay)."""
    dt = ns - time.perf_counter_ns()
    if dt > 0:
        time.sleep(dt / 1e9)
