"""Requests: seeded (prompt, target length) pairs drawn from a plan's workload or a trace, and admission.

A request's ``output_len`` counts every generated token, the prefill's token included, so an output of
``S`` tokens needs ``S - 1`` decode iterations. By default generation is forced to ``output_len`` (EOS is
ignored, as in the paper's evaluation); with ``stop_at_eos`` it also ends at the first EOS token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from exegpt.errors import ExeGPTError
from exegpt.rules import sample_lengths
from exegpt.workload import Workload

from .report import FAILED, FINISHED, RequestRecord


@dataclass(frozen=True, slots=True)
class Request:
    """One query: a prompt of token ids and the number of tokens to generate."""

    id: int
    """Position in the request stream (0, 1, ...); unique within a run."""
    prompt: tuple[int, ...]
    """Prompt token ids, each in [0, vocab_size)."""
    output_len: int
    """Target number of generated tokens, the prefill's first token included (>= 1)."""

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


def make_requests(workload: Workload, n: int, vocab_size: int, seed: int = 0,
                  joint: bool = True) -> tuple[Request, ...]:
    """``n`` requests with lengths drawn from ``workload`` and uniformly random prompt ids.

    Lengths come from the workload's joint (input, output) sample when it has one (a trace) and
    ``joint`` is set, else from the two marginals independently. Deterministic in ``seed``.
    """
    if n < 1:
        raise ExeGPTError(f"number of requests {n!r} must be >= 1")
    if vocab_size < 1:
        raise ExeGPTError(f"vocab_size={vocab_size!r} must be >= 1")
    rng, lengths = sample_lengths(workload, n, seed, joint)  # the lengths a replay (exegpt.replay) sees
    return tuple(
        Request(i, tuple(int(t) for t in rng.integers(0, vocab_size, size=int(inp))), int(out))
        for i, (inp, out) in enumerate(lengths))


def requests_from_pairs(pairs, vocab_size: int, seed: int = 0) -> tuple[Request, ...]:
    """Requests with exactly the given (input_len, output_len) pairs, in order, and random prompts."""
    rng = np.random.default_rng(seed)
    out = []
    for i, (inp, o) in enumerate(pairs):
        if int(inp) < 1:
            raise ExeGPTError(f"request {i}: input_len={inp!r} must be >= 1")
        out.append(Request(i, tuple(int(t) for t in rng.integers(0, vocab_size, size=int(inp))), int(o)))
    return tuple(out)


def reject_reason(req: Request, max_seq_len: int, cache_len: int) -> str | None:
    """Why ``req`` cannot run (None if it can).

    Args:
        max_seq_len: the model's context length.
        cache_len: positions per KV-cache row, the plan's memory budget per sequence.
    """
    if req.total_len > max_seq_len:
        return (f"prompt {req.input_len} + output {req.output_len} = {req.total_len} tokens exceeds the "
                f"model's context of {max_seq_len}")
    if req.total_len > cache_len:
        return (f"prompt {req.input_len} + output {req.output_len} = {req.total_len} tokens exceeds the "
                f"plan's KV-cache budget of {cache_len} tokens per sequence")
    return None


class RequestTracker:
    """The driver's ledger of every request: admission, timeline, tokens and completion.

    Times are seconds since the run's start (``clock()``). Every request ends as exactly one
    ``RequestRecord``: finished, or failed with a reason.
    """

    def __init__(self, requests: tuple[Request, ...], latency_len: int, max_seq_len: int, cache_len: int,
                 stop_at_eos: bool = False, eos_id: int | None = None, keep_tokens: bool = False):
        ids = [r.id for r in requests]
        if len(set(ids)) != len(ids):
            raise ExeGPTError("request ids must be unique")
        if stop_at_eos and eos_id is None:
            raise ExeGPTError("stop at EOS needs an EOS token id (the model has no tokenizer; pass eos_id)")
        self.requests = {r.id: r for r in requests}
        self.latency_len, self.stop_at_eos, self.eos_id, self.keep_tokens = latency_len, stop_at_eos, eos_id, \
            keep_tokens
        self.rejected = {r.id: reason for r in requests
                         if (reason := reject_reason(r, max_seq_len, cache_len)) is not None}
        self.runnable = [r for r in requests if r.id not in self.rejected]
        self.tokens: dict[int, list[int]] = {}
        self.start_s: dict[int, float] = {}
        self.first_s: dict[int, float] = {}
        self.finish_s: dict[int, float] = {}
        self.len_token_s: dict[int, float] = {}
        self.on_finish = None
        """Optional callable(rid) run when a request finishes (progress bars)."""

    def start(self, rid: int, t: float) -> None:
        """``rid``'s encode started at ``t``."""
        self.start_s[rid] = t
        self.tokens[rid] = []

    def token(self, rid: int, tok: int, t: float) -> bool:
        """Records ``rid``'s next token, produced at ``t``; returns whether the request is now finished."""
        toks = self.tokens[rid]
        if rid in self.finish_s:
            raise ExeGPTError(f"request {rid} got a token after it finished")
        toks.append(int(tok))
        n = len(toks)
        if n == 1:
            self.first_s[rid] = t
        if n == self.latency_len:
            self.len_token_s[rid] = t
        if n >= self.requests[rid].output_len or (self.stop_at_eos and tok == self.eos_id):
            self.finish_s[rid] = t
            if self.on_finish is not None:
                self.on_finish(rid)
            return True
        return False

    def done(self, rid: int) -> bool:
        return rid in self.finish_s

    def last(self, rid: int) -> int:
        return self.tokens[rid][-1]

    @property
    def num_done(self) -> int:
        return len(self.finish_s) + len(self.rejected)

    def records(self, failure: str = "the run ended before the request finished") -> list[RequestRecord]:
        out = []
        for rid, r in self.requests.items():
            toks = self.tokens.get(rid, [])
            common = dict(id=rid, input_len=r.input_len, output_len=r.output_len,
                          encode_start_s=self.start_s.get(rid), first_token_s=self.first_s.get(rid),
                          num_generated=len(toks), latency_len_token_s=self.len_token_s.get(rid),
                          tokens=tuple(toks) if self.keep_tokens else None)
            if rid in self.rejected:
                out.append(RequestRecord(status=FAILED, reason=self.rejected[rid], **common))
            elif rid in self.finish_s:
                out.append(RequestRecord(status=FINISHED, finish_s=self.finish_s[rid], **common))
            else:
                out.append(RequestRecord(status=FAILED, reason=failure, **common))
        return out
