"""The head of pipelined speculative decoding: which runs to launch, how a run's target tokens verify its draft,
what to commit and which in-flight runs to cancel, and which KV cache rows each run computes in. Pure Python; the
runner (``runner.pipeinfer``) and the simulated timeline (``exegpt.spec_sim``) drive the same ``SpecHead``, so
both engines take the same decisions on the same tokens.

A *run* feeds contiguous tokens of one request at positions ``[start, start + len)`` through the target's
pipeline and comes back with the target's greedy token after each of them. A run of tree width w carries up to w
*branches*: token chains from the same start, each in a KV cache row of its own (a w-row micro-batch, each row a
plain causal chain), the drafter's most confident first (branch 0, the *trunk*). Committed tokens are the prompt and
the generated tokens; every position but the last committed one holds valid KV in the request's main row on every
stage. Runs in flight cover consecutive positions after that, each continuing the trunk of the one before (a
speculative run's tokens are the drafter's guesses of what follows the tokens in flight before it).

Verification. A run's first token is checked against the target token the run before it returned (a branch whose
first token differs is dead; a run with no live branch is cancelled); within a run, each live branch is walked
against its own returned tokens, and the branch whose prefix the target agrees with longest wins (the trunk on a
tie). Its agreed tokens are committed, then the target's token after them: the correction at the first mismatch,
or the bonus when the whole branch agreed. Later runs in flight continue the trunk, so they survive only when the
trunk won in full and the next run's first token is the bonus; otherwise every later run is cancelled. When only a
sibling of a run still in flight is live (its trunk's first token was wrong, a sibling's right), that sibling
becomes the trunk and the runs after it are cancelled at once. Every run that comes back valid commits at least
one token, so decoding is exactly the target's greedy decoding whatever the drafter proposes (lossless).

KV rows. A request holds ``cache_rows(mode, width, depth)`` rows on each stage: its main row (the chain's KV) and
w - 1 rows for the siblings of each speculative run that may be in flight. The head keeps, per row, the tokens
whose KV the row holds once every run launched is computed; a sibling row is brought up to date lazily, by
"copy positions [a, b) of row x to row y" operations the run carries (``Run.copies``), which every stage executes
before computing the run (stages compute runs in launch order, so the copied KV is there). When a sibling wins,
its row becomes the main row (no copy back). A cancelled run's writes are forgotten: each row it wrote is known
only up to the lowest position it wrote (stages roll the rest back by resetting the row's length when it is next
written).

Modes: ``plain`` (one 1-token run at a time: pipelined decoding), ``sync`` (one run at a time, the committed
token and a draft made from the committed tokens: standard (tree) speculative decoding), ``pipeinfer``
(PipeInfer's continuous asynchronous speculation: a 1-token non-speculative run whenever nothing valid is in
flight, and a speculative run from each draft while fewer than ``depth`` speculative runs are in flight; a draft
made before a cancellation is dropped).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .errors import ExeGPTError
from .spec_run import Run, SpecCounts

__all__ = ["MAX_WIDTH", "MODES", "Run", "SpecCounts", "SpecHead", "cache_rows", "common_prefix"]

MODES = ("plain", "sync", "pipeinfer")
MAX_WIDTH = 4
"""Branches a run carries at most (PipeInfer's trees are narrow; past a few, siblings rarely rescue a token)."""


def cache_rows(mode: str, width: int, depth: int) -> int:
    """KV cache rows one request holds on each stage: its main row, and w - 1 sibling rows per speculative run that
    may be in flight (``depth`` of them in PipeInfer, one in sync mode; plain decoding has no tree)."""
    if mode == "plain" or width <= 1:
        return 1
    return 1 + (width - 1) * (depth if mode == "pipeinfer" else 1)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass(slots=True)
class SpecHead:
    """The head's state for one request after its prefill (which wrote the prompt's KV to row 0): ``prompt`` and
    its first generated token ``first``, ``output_len`` tokens to generate."""

    prompt: tuple[int, ...]
    first: int
    output_len: int
    mode: str
    depth: int = 1
    """PipeInfer: speculative runs in flight at most."""
    width: int = 1
    """Branches a speculative run carries at most (its tree width)."""
    ctx: list[int] = field(default_factory=list)
    runs: deque = field(default_factory=deque)
    counts: SpecCounts = field(default_factory=SpecCounts)
    asks: int = 0
    """Draft requests made (each reply names the one it answers)."""
    draft_pending: bool = False
    main: int = 0
    """The row that holds the chain's KV."""
    row_tokens: list = field(default_factory=list)
    """Per KV row: the tokens whose KV it holds on every stage once every run launched (and not cancelled) is
    computed."""
    _asked: list = field(default_factory=list)
    """The chain the outstanding draft continues."""
    _empty: list | None = None
    """A chain the drafter had nothing confident to propose for (no new request until the chain changes)."""
    _next_id: int = 0
    _trunk: dict = field(default_factory=dict)
    """Run id -> the branch later runs continue, where a sibling took the trunk's place in flight."""
    _writes: dict = field(default_factory=dict)
    """Run id -> {row: the lowest position it writes there} (what a cancellation makes unknown)."""

    def __post_init__(self):
        if self.mode not in MODES:
            raise ExeGPTError(f"speculation mode {self.mode!r} unknown; expected one of {', '.join(MODES)}")
        if isinstance(self.width, bool) or not isinstance(self.width, int) or not 1 <= self.width <= MAX_WIDTH:
            raise ExeGPTError(f"speculation tree width={self.width!r} must be a whole number in [1, {MAX_WIDTH}]")
        self.ctx = list(self.prompt) + [int(self.first)]
        rows = cache_rows(self.mode, self.width, self.depth)
        self.row_tokens = [list(self.prompt)] + [[] for _ in range(rows - 1)]

    # --- state ---------------------------------------------------------------------------------------

    @property
    def generated(self) -> list[int]:
        return self.ctx[len(self.prompt):]

    @property
    def done(self) -> bool:
        return len(self.ctx) - len(self.prompt) >= self.output_len

    def trunk(self, run: Run) -> tuple[int, ...]:
        """The branch of ``run`` that later runs continue."""
        return run.branches[self._trunk.get(run.id, 0)]

    def chain(self) -> list[int]:
        """The committed tokens and every trunk token in flight after them: what the next draft continues."""
        if not self.runs:
            return list(self.ctx)
        return self.ctx[:self.runs[0].start] + [t for r in self.runs for t in self.trunk(r)]

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
        """Marks a draft request outstanding; returns (its id, the context to continue, most tokens a branch).
        The drafter proposes up to ``width`` branches."""
        self.draft_pending = True
        self.asks += 1
        self._asked = self.chain()
        return self.asks, list(self._asked), max(1, len(self.prompt) + self.output_len - len(self._asked))

    def on_draft(self, ask: int, draft) -> Run | None:
        """The draft of request ``ask`` came back: a chain of tokens, or a list of branches (chains continuing the
        same context, the most confident first); returns the run to launch from it now (None: none). A draft whose
        context the chain has since grown past (a bonus committed) is used from there by the branches that guessed
        the new tokens; one a cancellation made stale is dropped."""
        if ask != self.asks:
            return None
        self.draft_pending = False
        branches = _branches(draft)[:self.width]
        asked, chain = self._asked, self.chain()
        grown = chain[len(asked):]
        kept = [b[len(grown):] for b in branches if b[:len(grown)] == grown]
        if chain[:len(asked)] != asked or (grown and not kept):
            self.counts.drafts_dropped += 1
            return None
        uniq: list[list[int]] = []
        for b in kept:
            if b and b not in uniq:
                uniq.append(b)
        if not uniq:
            if not grown:
                self._empty = chain
            return self.plain_run() if self.mode == "sync" else None
        if self.mode == "sync" or not self.runs:  # nothing in flight feeds the last committed token: this run does
            return self._launch([self.ctx[-1:] + b for b in uniq], len(self.ctx) - 1, True)
        return self._launch(uniq, len(chain), True)

    def plain_run(self) -> Run | None:
        """The 1-token run of the last committed token when nothing is in flight (and, in ``sync`` mode, no
        draft is being waited for)."""
        if self.runs or self.done or (self.mode == "sync" and (self.draft_pending or self.wants_draft())):
            return None
        return self._launch([[self.ctx[-1]]], len(self.ctx) - 1, False)

    def _launch(self, branches: list[list[int]], start: int, spec: bool) -> Run:
        """A run of ``branches`` from ``start``: the trunk in the main row, each sibling in a free row brought up to
        date with the chain's KV before ``start`` (the longest-agreeing free rows first, copying what they lack)."""
        rows_tok, main = self.row_tokens, self.main
        prefix = rows_tok[main][:start]
        if len(prefix) != start or prefix != self.chain()[:start]:
            raise ExeGPTError(f"speculation head: the main row holds {len(prefix)} positions of the chain before "
                              f"a run at {start}")
        rows, copies, writes = [main], [], {main: start}
        if len(branches) > 1:
            busy = {main} | {r for run in self.runs for r in run.rows}
            have = {r: common_prefix(rows_tok[r], prefix) for r in range(len(rows_tok)) if r not in busy}
            free = sorted(have, key=lambda r: (-have[r], r))
            branches = branches[:1 + len(free)]
            for r in free[:len(branches) - 1]:
                rows.append(r)
                a = have[r]
                writes[r] = start
                if a < start:
                    copies.append((main, r, a, start))
                    writes[r] = a
                    rows_tok[r][a:] = prefix[a:]
        for r, b in zip(rows, branches):
            rows_tok[r][start:] = b
        run = Run(self._next_id, start, tuple(int(t) for t in branches[0]), spec,
                  tuple(tuple(int(t) for t in b) for b in branches[1:]), tuple(rows), tuple(copies))
        self._next_id += 1
        self.runs.append(run)
        self._writes[run.id] = writes
        c = self.counts
        c.runs += 1
        c.spec_runs += spec
        c.tree_runs += run.width > 1
        c.siblings += run.width - 1
        c.copies += len(copies)
        c.copied += sum(b - a for _, _, a, b in copies)
        c.drafted += run.fed - run.width * (start == len(self.ctx) - 1)  # the committed token is not a draft
        c.fed_positions += run.fed
        return run

    def on_result(self, run_id: int, targets) -> tuple[list[int], list[Run]]:
        """The target's tokens after each token of run ``run_id`` (branch after branch). Returns (tokens committed,
        runs cancelled); a result of a run no longer in flight (cancelled) changes nothing."""
        if not self.runs or self.runs[0].id != run_id:
            if any(r.id == run_id for r in self.runs):
                raise ExeGPTError(f"run {run_id} came back before run {self.runs[0].id}: runs must return in order")
            return [], []
        run = self.runs.popleft()
        trunk = self._trunk.pop(run.id, 0)
        self._writes.pop(run.id, None)
        if len(targets) != run.fed:
            raise ExeGPTError(f"run {run.id} fed {run.fed} tokens but {len(targets)} came back")
        tgs = run.split(targets)
        live = [b for b, br in enumerate(run.branches) if br[0] == self.ctx[-1]]
        if run.start != len(self.ctx) - 1 or not live:
            raise ExeGPTError(f"run {run.id} at {run.start} is not the next valid run (ctx {len(self.ctx)})")
        c = self.counts
        if len(live) > 1 and 0 in live:  # the branches part after the committed token: at its first draft token
            self._fork([len(run.branches[b]) > 1 and run.branches[b][1] == tgs[b][0] for b in live])
        best, agreed = live[0], -1
        for b in live:
            br, tg, a = run.branches[b], tgs[b], 0
            while a + 1 < len(br) and br[a + 1] == tg[a]:
                a += 1
            if a > agreed:
                best, agreed = b, a
        br, tg = run.branches[best], tgs[best]
        full = agreed + 1 == len(br)
        c.accepted += agreed
        c.verified += agreed + (not full)
        self.main = run.rows[best]
        committed = self._commit(list(br[1:agreed + 1]) + [tg[agreed]])
        if self.runs and (best != trunk or not full or self.done):
            return committed, self._cancel_from(0)  # later runs continued another branch, or past the end
        if self.runs:  # the next run's first token against the bonus
            nxt = self.runs[0]
            live = [b for b, br in enumerate(nxt.branches) if br[0] == self.ctx[-1]]
            c.verified += 1
            if nxt.width > 1 and any(b[0] != nxt.tokens[0] for b in nxt.alts):  # the branches part at once
                self._fork([b[0] == self.ctx[-1] for b in nxt.branches])
            if not live:
                return committed, self._cancel_from(0)
            c.accepted += 1
            if 0 not in live:  # a sibling is the trunk now: the runs after it continued the old one
                self._trunk[nxt.id] = live[0]
                self.main = nxt.rows[live[0]]
                return committed, self._cancel_from(1)
        return committed, []

    def _fork(self, right: list[bool]) -> None:
        """Counts a verified fork: ``right[b]``, whether branch b holds the target's token where they part."""
        c = self.counts
        c.forks += 1
        if right[0]:
            return
        c.fork_misses += 1
        for ok in right[1:]:
            c.sibling_tries += 1
            if ok:
                c.rescued += 1
                return

    def _commit(self, tokens: list[int]) -> list[int]:
        room = len(self.prompt) + self.output_len - len(self.ctx)
        tokens = tokens[:room]
        self.ctx += tokens
        return tokens

    def _cancel_from(self, i: int) -> list[Run]:
        """Cancels the runs in flight from the i-th on; each row they wrote is known up to where they wrote."""
        gone = list(self.runs)[i:]
        for _ in gone:
            self.runs.pop()
        low: dict[int, int] = {}
        for r in gone:
            self._trunk.pop(r.id, None)
            for row, p in self._writes.pop(r.id).items():
                low[row] = min(low.get(row, p), p)
        for row, p in low.items():
            del self.row_tokens[row][p:]
        self.counts.cancelled += len(gone)
        return gone


def _branches(draft) -> list[list[int]]:
    """A draft as a list of branches: a chain of tokens is one branch."""
    draft = list(draft)
    if draft and not isinstance(draft[0], (list, tuple)):
        return [[int(t) for t in draft]]
    return [[int(t) for t in b] for b in draft]
