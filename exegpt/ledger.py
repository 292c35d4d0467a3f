"""The ledger of a run's requests: arrival, admission, tokens and completion, kept the same way by both engines.

Request ``i`` is the i-th of the stream (ids 0, 1, ...). A request's ``output_len`` counts every generated token,
the prefill's token included, so an output of ``S`` tokens needs ``S - 1`` decode iterations. Generation is forced
to ``output_len`` (EOS ignored, as in the paper's evaluation) unless ``stop_at_eos``.

Every request ends as exactly one ``RequestRecord``: finished, or failed with a reason (rejected on admission,
or still unfinished when the run ended).
"""

from __future__ import annotations

import math

import numpy as np

from .errors import ExeGPTError
from .report import FAILED, FINISHED, RequestRecord

UNFINISHED = "the run ended before the request finished"
QUEUED = "still queued when the run ended"


def reject_reason(input_len: int, output_len: int, max_seq_len: float, cache_len: float) -> str | None:
    """Why a request cannot run (None if it can). ``max_seq_len``: the model's context; ``cache_len``: positions
    per KV-cache row, the plan's memory budget per sequence."""
    total = input_len + output_len
    if total > max_seq_len:
        return (f"prompt {input_len} + output {output_len} = {total} tokens exceeds the model's context of "
                f"{max_seq_len}")
    if total > cache_len:
        return (f"prompt {input_len} + output {output_len} = {total} tokens exceeds the plan's KV-cache budget "
                f"of {cache_len} tokens per sequence")
    return None


class Ledger:
    """Per-request state in arrays (the simulated engine updates whole micro-batches at once)."""

    def __init__(self, lengths, arrival_s, latency_len, max_seq_len: float = math.inf,
                 cache_len: float = math.inf, stop_at_eos: bool = False, eos_id: int | None = None,
                 keep_tokens: bool = False, track_tokens: bool = False):
        lengths = np.asarray(lengths, dtype=np.int64).reshape(-1, 2)
        if (lengths < 1).any():
            raise ExeGPTError(f"request lengths must be at least 1 token each, got least value {lengths.min()}")
        if stop_at_eos and eos_id is None:
            raise ExeGPTError("stop at EOS needs an EOS token id (the model has no tokenizer; pass eos_id)")
        n = len(lengths)
        self.inp, self.out = lengths[:, 0].copy(), lengths[:, 1].copy()
        self.arrival = np.asarray(arrival_s, dtype=float).reshape(-1)
        if len(self.arrival) != n or (np.diff(self.arrival) < 0).any():
            raise ExeGPTError("arrival times must be one per request, in non-decreasing order")
        self.stop_at_eos, self.eos_id = stop_at_eos, eos_id
        self.latency_len = np.asarray(latency_len, dtype=np.int64)
        """The output length whose token time each request keeps (``at_len``): one for all, or one per request."""
        if self.latency_len.shape not in ((), (n,)):
            raise ExeGPTError(f"latency lengths must be one number or one per request ({n}), got shape "
                              f"{self.latency_len.shape}")
        self.latency_len = np.broadcast_to(self.latency_len, (n,))
        self.rejected = {i: why for i in range(n)
                         if (why := reject_reason(int(self.inp[i]), int(self.out[i]), max_seq_len, cache_len))}
        self.runnable = [i for i in range(n) if i not in self.rejected]
        self.gen = np.zeros(n, dtype=np.int64)
        self.start = np.full(n, math.nan)
        self.first = np.full(n, math.nan)
        self.finish = np.full(n, math.nan)
        self.at_len = np.full(n, math.nan)
        self.finished = np.zeros(n, dtype=bool)
        self.last_token = np.zeros(n, dtype=np.int64)
        self.keep_tokens = keep_tokens
        self.tokens: list[list[int]] | None = [[] for _ in range(n)] if keep_tokens or track_tokens else None
        """Each request's token ids (kept for the report, or to recompute a preempted request)."""
        self.on_finish = None
        """Optional callable(count) run when requests finish (progress bars)."""
        self.finish_log: list[int] | None = None
        """When a list, the ids of requests as they finish are appended to it (the runner streams their records
        to its launcher, so a run that then fails still reports them)."""

    def __len__(self) -> int:
        return len(self.inp)

    @property
    def num_done(self) -> int:
        return int(self.finished.sum()) + len(self.rejected)

    def done(self, rid: int) -> bool:
        return bool(self.finished[rid])

    def last(self, rid: int) -> int:
        return int(self.last_token[rid])

    def started(self, rids, t) -> None:
        """``rids``' prefill started at ``t`` (one time or one per request); a request's first start is kept."""
        rids = np.asarray(rids, dtype=np.int64)
        first = np.isnan(self.start[rids])
        self.start[rids[first]] = np.broadcast_to(t, rids.shape)[first]

    def tokens_at(self, rids, t: float, toks=None) -> None:
        """The next token of each of ``rids`` came at ``t`` (``toks``: their ids, when the engine has real ones)."""
        rids = np.asarray(rids, dtype=np.int64)
        if self.finished[rids].any():
            raise ExeGPTError(f"request {int(rids[self.finished[rids]][0])} got a token after it finished")
        self.gen[rids] += 1
        g = self.gen[rids]
        self.first[rids[g == 1]] = t
        self.at_len[rids[g == self.latency_len[rids]]] = t
        end = g >= self.out[rids]
        if toks is not None:
            toks = np.asarray(toks, dtype=np.int64)
            self.last_token[rids] = toks
            if self.tokens is not None:
                for r, tok in zip(rids.tolist(), toks.tolist()):
                    self.tokens[r].append(tok)
            if self.stop_at_eos:
                end |= toks == self.eos_id
        if end.any():
            self.finish[rids[end]] = t
            self.finished[rids[end]] = True
            if self.finish_log is not None:
                self.finish_log += rids[end].tolist()
            if self.on_finish is not None:
                self.on_finish(int(end.sum()))

    def token(self, rid: int, tok: int, t: float) -> bool:
        """One token of one request; returns whether the request is now finished."""
        self.tokens_at([rid], t, [tok])
        return bool(self.finished[rid])

    def records(self, failure: str = UNFINISHED) -> list[RequestRecord]:
        """Every request's record; an unfinished one fails with ``failure``."""
        return [self.record(i, failure) for i in range(len(self))]

    def record(self, i: int, failure: str = UNFINISHED) -> RequestRecord:
        common = dict(id=i, input_len=int(self.inp[i]), output_len=int(self.out[i]),
                      arrival_s=float(self.arrival[i]), encode_start_s=_opt(self.start[i]),
                      first_token_s=_opt(self.first[i]), num_generated=int(self.gen[i]),
                      latency_len_token_s=_opt(self.at_len[i]),
                      tokens=tuple(self.tokens[i]) if self.keep_tokens else None)
        if i in self.rejected:
            return RequestRecord(status=FAILED, reason=self.rejected[i], **common)
        if self.finished[i]:
            return RequestRecord(status=FINISHED, finish_s=float(self.finish[i]), **common)
        why = QUEUED if math.isnan(self.start[i]) and failure == UNFINISHED else failure
        return RequestRecord(status=FAILED, reason=why, **common)


def _opt(x: float) -> float | None:
    return None if math.isnan(x) else float(x)
