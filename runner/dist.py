"""Rank layout and point-to-point messages of plan execution.

Every message goes through ``torch.distributed`` send/recv: there is no other transport. Process launch, failure
handling and what ranks publish to the launcher are ``runner.launch``'s.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from exegpt.errors import ExeGPTError
from exegpt.stages import Stage

log = logging.getLogger(__name__)

# Message channels (gloo matches by tag; NCCL ignores tags, so every pair also keeps one fixed order).
TAG_CMD, TAG_TOKENS, TAG_META, TAG_KV, TAG_CREDIT, TAG_BULK = 1, 2, 3, 4, 5, 6
HEADER = 9
"""int64 words of a command header."""


# --- rank layout -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StageRanks:
    """The ranks of one pipeline stage: a TP group of ``len(ranks)`` ranks; ``ranks[0]`` leads it."""

    index: int
    """Position in its pipeline (0 = holds the embedding)."""
    stage: Stage
    ranks: tuple[int, ...]
    pipeline: str
    """'main' (RRA, static), 'encode' or 'decode' (WAA)."""
    first: bool
    last: bool

    @property
    def leader(self) -> int:
        return self.ranks[0]

    @property
    def layers(self) -> tuple[int, int]:
        return self.stage.first_layer, self.stage.first_layer + self.stage.n_layers


def layout(stages: tuple[Stage, ...]) -> tuple[StageRanks, ...]:
    """Assigns consecutive ranks to stages in plan order (WAA: encode stages, then decode stages)."""
    out, rank = [], 0
    pipes = [(p, [s for s in stages if _pipe(s) == p]) for p in ("main", "encode", "decode")]
    for pipe, group in pipes:
        for i, s in enumerate(group):
            out.append(StageRanks(i, s, tuple(range(rank, rank + s.tp)), pipe, i == 0, i == len(group) - 1))
            rank += s.tp
    return tuple(out)


def _pipe(s: Stage) -> str:
    return {"both": "main", "encode": "encode", "decode": "decode"}.get(s.role) or _bad_role(s)


def _bad_role(s: Stage):
    raise ExeGPTError(f"stage role {s.role!r} unknown; expected both, encode or decode")


# --- messages ----------------------------------------------------------------------------------


class Incoming:
    """A posted receive that can be asked whether its message is in, without blocking.

    NCCL's work answers ``is_completed()``; gloo's receive work says so only once waited on, so the first
    ``ready()`` hands its ``wait()`` to a thread of this process (gloo releases the GIL while it waits) and
    reads that. A receive that is only waited on never starts the thread."""

    _waiter = None  # one thread per process: the receives polled this way arrive in the order they were posted

    def __init__(self, work, buf: Tensor):
        self.work, self.buf = work, buf
        self._future = None
        self._done = False

    def ready(self) -> bool:
        if self._done:
            return True
        if self.buf.device.type == "cuda":
            return self.work.is_completed()
        if self._future is None:
            if Incoming._waiter is None:
                from concurrent.futures import ThreadPoolExecutor

                Incoming._waiter = ThreadPoolExecutor(1, thread_name_prefix="recv-poll")
            self._future = Incoming._waiter.submit(self.work.wait)
        return self._future.done()

    def wait(self) -> Tensor:
        """The received tensor, once it is in (a receive is waited on once, whatever is asked)."""
        if not self._done:
            if self._future is not None:
                self._future.result()
            else:
                self.work.wait()
            self._done = True
        return self.buf


class Comm:
    """Point-to-point messages of one rank. Sends are asynchronous; their buffers are kept alive until done."""

    def __init__(self, device: torch.device):
        self.device = device
        self.equal_counts = device.type == "cuda"
        """NCCL: a receive takes exactly the count sent (gloo takes a shorter message into a larger buffer)."""
        self.prepost = device.type != "cuda"
        """Post receives before they are needed (gloo: a message moves only into a posted receive). Not on NCCL,
        where the messages of a pair of ranks share one stream: a posted receive would hold back every later send
        to the same peer until it completes, and the GPU moves a message without a posted receive anyway."""
        self._pending: list[tuple[Any, tuple[Tensor, ...]]] = []
        self._limit = 64

    def send(self, tensors: list[Tensor], dst: int, tag: int) -> None:
        for t in tensors:
            t = t.contiguous().to(self.device)
            self._pending.append((dist.isend(t, dst, tag=tag), (t,)))
        if len(self._pending) > self._limit:
            self._reap()

    def _reap(self) -> None:
        """Drops completed sends. Each ``is_completed()`` costs microseconds, so the list is scanned only when it
        has doubled since the last scan (amortised O(1) per send, not a scan of 64 sends at every send)."""
        self._pending = [(w, t) for w, t in self._pending if not w.is_completed()]
        self._limit = max(64, 2 * len(self._pending))

    def recv(self, shape, dtype: torch.dtype, src: int, tag: int) -> Tensor:
        buf = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(buf, src, tag=tag)
        return buf

    def irecv(self, shape, dtype: torch.dtype, src: int, tag: int) -> Incoming:
        buf = torch.empty(shape, dtype=dtype, device=self.device)
        return Incoming(dist.irecv(buf, src, tag=tag), buf)

    def flush(self) -> None:
        """Waits for every outstanding send."""
        for w, _ in self._pending:
            w.wait()
        self._pending.clear()
