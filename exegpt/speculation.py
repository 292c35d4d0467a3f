"""The head of pipelined speculative decoding: which runs to launch, how a run's target tokens verify its draft,
what to commit and which in-flight runs to cancel. Pure Python; the runner (``runner.pipeinfer``) and the simulated
timeline (``exegpt.spec_sim``) drive the same ``SpecHead``, so both engines take the same decisions on the same
tokens.

A *run* feeds contiguous tokens of one request at positions ``[start, start + len)`` through the target's
pipeline and comes back with the target's greedy token after each of them. Committed tokens are the prompt and
the generated tokens; every position but the last committed one holds valid KV on every stage. Runs in flight
cover consecutive positions after that, each continuing the one before (a speculative run's tokens are the
drafter's guesses of what follows the tokens in flight before it). A run's first token is checked against the
target token the run before it returned; the rest against the run's own returned tokens. At the first mismatch
the target's token is committed in the draft's place and every later run in flight is cancelled; when all
match, the run's last returned token (the bonus) is committed. Every run that comes back valid commits at least
one token, so decoding is exactly the target's greedy decoding whatever the drafter proposes (lossless).

Modes: ``plain`` (one 1-token run at a time: pipelined decoding), ``sync`` (one run at a time, the committed
token and a draft made from the committed tokens: standard speculative decoding), ``pipeinfer`` (PipeInfer's
continuous asynchronous speculation: a 1-token non-speculative run whenever nothing valid is in flight, and a
speculative run from each draft while fewer than ``depth`` speculative runs are in flight; a draft made before a
cancellation is dropped).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .errors import ExeGPTError

MODES = ("plain", "sync", "pipeinfer")


@dataclass(frozen=True, slots=True)
class Run:
    id: int
    start: int
    """Position of the first token fed."""
    tokens: tuple[int, ...]
    spec: bool
    """Carries drafted tokens (else: the committed token alone)."""

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


@dataclass(slots=True)
class SpecCounts:
    """What one request's head counted."""

    runs: int = 0
    spec_runs: int = 0
    cancelled: int = 0
    """Runs cancelled in flight (their KV is rolled back on every stage that computed them)."""
    drafted: int = 0
    """Draft tokens sent to the target in runs."""
    verified: int = 0
    """Draft tokens compared with the target's token (a cancelled run's are not)."""
    accepted: int = 0
    drafts_dropped: int = 0
    """Drafts that came back after a cancellation made them stale."""
    fed_positions: int = 0

    def add(self, other: SpecCounts) -> None:
        for f in self.__slots__:
            setattr(self, f, getattr(self, f) + getattr(other, f))

    @property
    def acceptance(self) -> float:
        """Accepted draft tokens per verified draft token (the greedy agreement rate)."""
        return self.accepted / self.verified if self.verified else float("nan")


@dataclass(slots=True)
class SpecHead:
    """The head's state for one request after its prefill: ``prompt`` and its first generated token ``first``,
    ``output_len`` tokens to generate."""

    prompt: tuple[int, ...]
    first: int
    output_len: int
    mode: str
    depth: int = 1
    """PipeInfer: speculative runs in flight at most."""
    ctx: list[int] = field(default_factory=list)
    runs: deque = field(default_factory=deque)
    counts: SpecCounts = field(default_factory=SpecCounts)
    asks: int = 0
    """Draft requests made (each reply names the one it answers)."""
    draft_pending: bool = False
    _asked: list = field(default_factory=list)
    """The chain the outstanding draft continues."""
    _empty: list | None = None
    """A chain the drafter had nothing confident to propose for (no new request until the chain changes)."""
    _next_id: int = 0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ExeGPTError(f"speculation mode {self.mode!r} unknown; expected one of {', '.join(MODES)}")
        self.ctx = list(self.prompt) + [int(self.first)]

    # --- state ---------------------------------------------------------------------------------------

    @property
    def generated(self) -> list[int]:
        return self.ctx[len(self.prompt):]

    @property
    def done(self) -> bool:
        return len(self.ctx) - len(self.prompt) >= self.output_len

    def chain(self) -> list[int]:
        """The committed tokens and every token in flight after them: what the next draft continues."""
        if not self.runs:
            return list(self.ctx)
        return self.ctx[:self.runs[0].start] + [t for r in self.runs for t in r.tokens]

    def _spec_in_flight(self) -> int:
        return sum(r.spec for r in self.runs)

    def _room(self) -> int:
        """Tokens still worth speculating: those the request still needs beyond what is in flight."""
        return len(self.prompt) + self.output_len - len(self.chain())

    # --- decisions -----------------------------------------------------------------------------------

    def wants_draft(self) -> bool:
        """Whether to ask the drafter for a draft of the current chain now."""
        if self.mode == "plain" or self.draft_pending or self.done or self._empty == self.chain():
            return False
        if self.mode == "sync":
            return not self.runs and self._room() > 0
        return self._spec_in_flight() < self.depth and self._room() > 0

    def ask_draft(self) -> tuple[int, list[int], int]:
        """Marks a draft request outstanding; returns (its id, the context to continue, most tokens)."""
        self.draft_pending = True
        self.asks += 1
        self._asked = self.chain()
        return self.asks, list(self._asked), max(1, len(self.prompt) + self.output_len - len(self._asked))

    def on_draft(self, ask: int, tokens) -> Run | None:
        """The draft of request ``ask`` came back; returns the run to launch from it now (None: none). A draft
        whose context the chain has since grown past (a bonus committed) is used from there if it guessed the
        new tokens; one a cancellation made stale is dropped."""
        if ask != self.asks:
            return None
        self.draft_pending = False
        tokens, asked, chain = [int(t) for t in tokens], self._asked, self.chain()
        grown = chain[len(asked):]
        if chain[:len(asked)] != asked or tokens[:len(grown)] != grown:
            self.counts.drafts_dropped += 1
            return None
        tokens = tokens[len(grown):]
        if not tokens:
            if not grown:
                self._empty = chain
            return self.plain_run() if self.mode == "sync" else None
        if self.mode == "sync" or not self.runs:  # nothing in flight feeds the last committed token: this run does
            return self._launch(self.ctx[-1:] + list(tokens), len(self.ctx) - 1, True)
        return self._launch(tokens, len(self.chain()), True)

    def plain_run(self) -> Run | None:
        """The 1-token run of the last committed token when nothing is in flight (and, in ``sync`` mode, no
        draft is being waited for)."""
        if self.runs or self.done or (self.mode == "sync" and (self.draft_pending or self.wants_draft())):
            return None
        return self._launch([self.ctx[-1]], len(self.ctx) - 1, False)

    def _launch(self, tokens, start: int, spec: bool) -> Run:
        run = Run(self._next_id, start, tuple(int(t) for t in tokens), spec)
        self._next_id += 1
        self.runs.append(run)
        c = self.counts
        c.runs += 1
        c.spec_runs += spec
        c.drafted += len(tokens) - (start == len(self.ctx) - 1)  # the committed token is not a draft
        c.fed_positions += len(tokens)
        return run

    def on_result(self, run_id: int, targets) -> tuple[list[int], list[Run]]:
        """The target's tokens after each token of run ``run_id``. Returns (tokens committed, runs cancelled);
        a result of a run no longer in flight (cancelled) changes nothing."""
        if not self.runs or self.runs[0].id != run_id:
            if any(r.id == run_id for r in self.runs):
                raise ExeGPTError(f"run {run_id} came back before run {self.runs[0].id}: runs must return in order")
            return [], []
        run = self.runs.popleft()
        targets = [int(t) for t in targets]
        if len(targets) != len(run.tokens):
            raise ExeGPTError(f"run {run.id} fed {len(run.tokens)} tokens but {len(targets)} came back")
        if run.start != len(self.ctx) - 1 or run.tokens[0] != self.ctx[-1]:
            raise ExeGPTError(f"run {run.id} at {run.start} is not the next valid run (ctx {len(self.ctx)})")
        committed, c = [], self.counts
        for i in range(1, len(run.tokens)):
            c.verified += 1
            if run.tokens[i] != targets[i - 1]:  # rejected: the target's token instead, the rest cancelled
                committed.append(targets[i - 1])
                return self._commit(committed), self._cancel_all()
            c.accepted += 1
            committed.append(run.tokens[i])
        committed.append(targets[-1])  # the bonus
        committed = self._commit(committed)
        if self.runs and self.done:
            return committed, self._cancel_all()  # speculation past the request's end
        if self.runs:
            c.verified += 1
            if self.runs[0].tokens[0] != self.ctx[-1]:
                return committed, self._cancel_all()
            c.accepted += 1
        return committed, []

    def _commit(self, tokens: list[int]) -> list[int]:
        room = len(self.prompt) + self.output_len - len(self.ctx)
        tokens = tokens[:room]
        self.ctx += tokens
        return tokens

    def _cancel_all(self) -> list[Run]:
        gone = list(self.runs)
        self.runs.clear()
        self.counts.cancelled += len(gone)
        return gone
