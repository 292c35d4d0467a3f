"""What a policy's driver says to the engine that runs it: actions as plain data, and the view it reads.

A driver is a generator function ``driver(view)``: it yields actions, the engine executes each one and sends back
its result, and the generator's return value is what the driver measured (``DriverStats``). The simulated engine
(``exegpt.sim``) prices each action with the profile on a clock of its own; the runner's engine
(``runner.engine``) executes it on the ranks of the driver's group and reads the wall clock. The decisions (which
prompts to prefill, which rows to decode and how often, when to free rows, when to wait) are the driver's; how a
prefill is pipelined over stages, how KV moves and how long anything takes are the engine's.

Groups: a policy runs one driver per group of stages. ``main``: one pipeline over the policy's stages (RRA,
static, continuous batching); ``encode`` and ``decode``: two pipelines on disjoint devices, the encode group
handing each prefilled batch's KV to the decode group (WAA, prefill/decode disaggregation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generator, Protocol

from ..rules import SteadyWindow

MAIN, ENCODE, DECODE = "main", "encode", "decode"
GROUPS = (MAIN, ENCODE, DECODE)


@dataclass(frozen=True, slots=True)
class Prefill:
    """Prefill ``rids`` (in order) into free cache rows of the group, as ``parts`` pipelined micro-batches of
    contiguous requests (``rules.split_even``). ``main``: done when their first tokens are back; ``encode``: done
    when the driver's own stage has finished them, the batch then goes to the decode group. Result: None."""

    rids: tuple[int, ...]
    parts: int = 1
    resume: bool = False
    """Recompute requests a preemption evicted: prefill each one's prompt and every token it generated but the
    last, and record no token (the last one is the next decode's input)."""
    sp: bool = False
    """Shift Parallelism: run in the stages' base configuration (Ulysses sequence parallelism, ``Stage.sp``)
    instead of as TP over their devices. Stages without one (``sp`` 1) run TP either way."""


@dataclass(frozen=True, slots=True)
class Chunk:
    """Prefill prompt chunks: ``items`` of (request, start, length), each the prompt tokens ``[start, start +
    length)`` after the ``start`` its row already holds (``start`` 0 takes a free row), as ``parts`` pipelined
    micro-batches. A chunk that ends its prompt gives the request's first token. Result: None.

    With a prefix cache (a policy's ``prefix_cache_tokens``), a request that holds no row yet takes a free row
    holding the ``start`` = ``View.cached_prefix`` tokens the cache has of its prompt, and a chunk that ends a
    prompt caches it (``exegpt.radix.PrefixCache``)."""

    items: tuple[tuple[int, int, int], ...]
    parts: int = 1
    sp: bool = False
    """As ``Prefill.sp``."""
    overlap: bool = False
    """Priced by the simulated engine as run alongside the decode iteration just before it (NanoFlow's operator
    overlap: the step takes the longer of the two); the runner runs them one after the other."""


@dataclass(frozen=True, slots=True)
class Decode:
    """Decode ``micro_batches`` (request ids), pipelined over the group's stages, each for up to ``max_iters``
    iterations: a micro-batch's next iteration starts once its tokens are back. With ``drop_finished`` a row
    leaves its micro-batch as soon as its request finishes (early termination); without it (static batching)
    finished rows are computed on, their tokens discarded, until every request of the micro-batches is done.
    Result: the rows computed at each iteration (``tuple[int, ...]``)."""

    micro_batches: tuple[tuple[int, ...], ...]
    max_iters: int = 1
    drop_finished: bool = True
    sp: bool = False
    """As ``Prefill.sp``."""


@dataclass(frozen=True, slots=True)
class Compact:
    """Free the cache rows of finished requests (the rows left keep their order). Result: None."""


@dataclass(frozen=True, slots=True)
class Evict:
    """Free the cache rows of these unfinished requests (a preemption); a later ``Prefill(resume=True)`` brings
    them back. Result: None."""

    rids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class WaitArrival:
    """Wait until the next request arrives. Result: None."""


@dataclass(frozen=True, slots=True)
class AwaitCredit:
    """Encode group: wait until the decode group has merged one more of the batches handed to it. Result: None."""


@dataclass(frozen=True, slots=True)
class EndHandOffs:
    """Encode group: no more batches will come. Result: None."""


@dataclass(frozen=True, slots=True)
class Merge:
    """Decode group: wait for the next batch the encode group handed off and import it into free rows after the
    rows in use. Result: ``Merged`` (None once the encode group has ended)."""


@dataclass(frozen=True, slots=True)
class Peek:
    """Decode group: the requests of the next batch the encode group handed off, without importing it: once it
    is here (``wait``), or only if it is here already (else ``()``). Result: ``tuple[int, ...]`` (None once the
    encode group has ended and every batch was merged). A ``Merge`` then imports that batch."""

    wait: bool = True


@dataclass(frozen=True, slots=True)
class Merged:
    rids: tuple[int, ...]
    encode_s: float
    """The batch's prefill, from its start to its first tokens."""


Action = Prefill | Chunk | Decode | Compact | Evict | WaitArrival | AwaitCredit | EndHandOffs | Peek | Merge


@dataclass(frozen=True, slots=True)
class DriverStats:
    """What a driver measured: encode phases (or batches), decode iterations, and its steady window."""

    encode_s: tuple[float, ...]
    decode: tuple[tuple[float, int], ...]
    """(seconds, rows) per decode iteration."""
    steady: SteadyWindow | None = None


class View(Protocol):
    """What a driver may read, synchronously, from its engine."""

    num_stages: int
    """Stages of the driver's group."""
    max_len: int
    """KV positions per cache row."""

    def now(self) -> float:
        """Seconds since the run's start on the driver's clock."""

    def waiting(self) -> list[int]:
        """Runnable requests that have arrived and that no prefill took yet, in arrival order."""

    def arrived(self) -> int:
        """Runnable requests that have arrived so far."""

    def num_runnable(self) -> int:
        """Requests the run will serve (the others failed on admission)."""

    def more_to_come(self) -> bool:
        """Whether some runnable request has not arrived yet."""

    def done(self, rid: int) -> bool:
        """Whether ``rid`` has its last token."""

    def input_len(self, rid: int) -> int:
        """``rid``'s prompt tokens."""

    def generated(self, rid: int) -> int:
        """Tokens ``rid`` has generated so far."""

    def prompt(self, rid: int) -> tuple[int, ...]:
        """``rid``'s prompt token ids (the simulated engine without given prompts: distinct made-up ones)."""

    def cached_prefix(self, rid: int) -> int:
        """Leading prompt tokens of ``rid`` the run's prefix cache holds now (0 without one)."""


Driver = Callable[[View], Generator[Action, object, DriverStats | None]]


def drop_finished(view: View, rows: list[int]):
    """Frees the cache rows of finished requests (``Compact``) when some of ``rows`` finished; returns the
    requests left, in row order (``rows = yield from drop_finished(view, rows)``)."""
    keep = [r for r in rows if not view.done(r)]
    if len(keep) < len(rows):
        yield Compact()
    return keep


def decision(group: str, action: Action, result) -> str:
    """One line of a run's decision log: the group, the action and what came of it (rows per decode iteration,
    the requests a peek saw or a merge brought), the same in both engines."""
    if isinstance(action, Merge):
        return f"{group} Merge -> {None if result is None else result.rids}"
    if isinstance(action, (Decode, Peek)):
        return f"{group} {action!r} -> {None if result is None else tuple(result)}"
    return f"{group} {action!r}"
