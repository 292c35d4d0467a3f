"""Requests: seeded (prompt, target length, arrival) triples drawn from a plan's workload or a trace.

A request's ``output_len`` counts every generated token, the prefill's token included, so an output of
``S`` tokens needs ``S - 1`` decode iterations. The lengths and arrival times are ``exegpt.arrivals.request_stream``'s,
the ones the simulated engine serves for the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from exegpt.arrivals import Arrivals, request_stream
from exegpt.errors import ExeGPTError
from exegpt.workload import Workload


@dataclass(frozen=True, slots=True)
class Request:
    """One query: a prompt of token ids and the number of tokens to generate."""

    id: int
    """Position in the request stream (0, 1, ...); unique within a run."""
    prompt: tuple[int, ...]
    """Prompt token ids, each in [0, vocab_size)."""
    output_len: int
    """Target number of generated tokens, the prefill's first token included (>= 1)."""
    arrival_s: float = 0.0
    """When it arrives, in seconds from the run's start (requests are in arrival order)."""

    def __post_init__(self):
        if len(self.prompt) < 1:
            raise ExeGPTError(f"request {self.id}: the prompt must have at least one token")
        if self.output_len < 1:
            raise ExeGPTError(f"request {self.id}: output_len={self.output_len} must be >= 1")

    @property
    def input_len(self) -> int:
        return len(self.prompt)

    @property
    def total_len(self) -> int:
        """Context the request reaches: prompt plus every generated token."""
        return self.input_len + self.output_len


def make_requests(workload: Workload, n: int, vocab_size: int, seed: int = 0, joint: bool = True,
                  arrivals: Arrivals | None = None) -> tuple[Request, ...]:
    """``n`` requests with lengths drawn from ``workload``, arriving by ``arrivals`` (default: all at once), and
    uniformly random prompt ids.

    Lengths come from the workload's joint (input, output) sample when it has one (a trace) and
    ``joint`` is set, else from the two marginals independently. Deterministic in ``seed``.
    """
    if vocab_size < 1:
        raise ExeGPTError(f"vocab_size={vocab_size!r} must be >= 1")
    stream = request_stream(workload, n, seed, arrivals, joint)  # what the simulated engine serves
    rng = stream.rng
    return tuple(
        Request(i, tuple(int(t) for t in rng.integers(0, vocab_size, size=int(inp))), int(out), float(at))
        for i, ((inp, out), at) in enumerate(zip(stream.lengths, stream.arrival_s)))


def requests_from_pairs(pairs, vocab_size: int, seed: int = 0) -> tuple[Request, ...]:
    """Requests with exactly the given (input_len, output_len) pairs, in order, and random prompts."""
    rng = np.random.default_rng(seed)
    out = []
    for i, (inp, o) in enumerate(pairs):
        if int(inp) < 1:
            raise ExeGPTError(f"request {i}: input_len={inp!r} must be >= 1")
        out.append(Request(i, tuple(int(t) for t in rng.integers(0, vocab_size, size=int(inp))), int(o)))
    return tuple(out)


def requests_of(pool) -> tuple[Request, ...]:
    """The requests of an ``exegpt.prefix_workload.PrefixPool``: its prompts' token ids and output lengths, all
    arriving at once (the same requests ``run_simulated(plan, lengths=pool.lengths, prompts=pool.prompts)``
    serves)."""
    return tuple(Request(i, tuple(q), int(d)) for i, (q, d) in enumerate(zip(pool.prompts, pool.outputs)))
