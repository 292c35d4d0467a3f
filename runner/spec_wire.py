"""The messages of PipeInfer's executor (``runner.pipeinfer``, ``runner.spec_head``): their tags and header
words, and the emulated slow link's wait."""

from __future__ import annotations

import time

TAG_RUN, TAG_HIDDEN, TAG_RESULT, TAG_CANCEL, TAG_DRAFT_REQ, TAG_DRAFT, TAG_STATS = 21, 22, 23, 24, 25, 26, 27
RUN_WORDS = 8
"""A run header's fixed words: kind (0 run, 1 stop), run id, start, tokens (every branch's), outputs wanted, send
ns, branches w, row copies c; then ``run_hdr(width)`` words in all: the row of each branch, the tokens of each
branch (``width`` slots each), and the copies (source row, destination row, a, b; ``width - 1`` slots)."""
STAGE_STATS = 13
"""A stage's counts: runs computed, runs skipped, runs aborted mid-way, KV positions rolled back, layers computed,
layers a cancellation saved; then the sums of its decode runs' (tokens b, seconds t): n, Σb, Σt, Σb², Σbt (b: the
padded micro-batch, w rows of the longest branch); then KV row copies executed and the positions they copied."""
STOP = 1


def run_hdr(width: int) -> int:
    """Words of a run header for trees of up to ``width`` branches."""
    return RUN_WORDS + 2 * width + 4 * (width - 1)


def pack_run(width: int, gid: int, start: int, lens, rows, copies, n_out: int, sent: int) -> list[int]:
    """A run header (``RUN_WORDS``): ``lens`` and ``rows`` per branch, ``copies`` as (src, dst, a, b)."""
    w, c = len(lens), len(copies)
    hdr = [0, gid, start, sum(lens), n_out, sent, w, c] + [0] * (run_hdr(width) - RUN_WORDS)
    hdr[RUN_WORDS:RUN_WORDS + w] = rows
    hdr[RUN_WORDS + width:RUN_WORDS + width + w] = lens
    at = RUN_WORDS + 2 * width
    for i, cp in enumerate(copies):
        hdr[at + 4 * i:at + 4 * i + 4] = cp
    return hdr


def unpack_run(width: int, hdr: list[int]) -> tuple:
    """(kind, gid, start, n_tok, n_out, sent, lens, rows, copies) of a run header."""
    kind, gid, start, n_tok, n_out, sent, w, c = hdr[:RUN_WORDS]
    rows = hdr[RUN_WORDS:RUN_WORDS + w]
    lens = hdr[RUN_WORDS + width:RUN_WORDS + width + w]
    at = RUN_WORDS + 2 * width
    copies = [tuple(hdr[at + 4 * i:at + 4 * i + 4]) for i in range(c)]
    return kind, gid, start, n_tok, n_out, sent, lens, rows, copies


def wait_until(ns: int) -> None:
    """Sleeps until ``perf_counter_ns`` reaches ``ns`` (a hop's emulated delay)."""
    dt = ns - time.perf_counter_ns()
    if dt > 0:
        time.sleep(dt / 1e9)
