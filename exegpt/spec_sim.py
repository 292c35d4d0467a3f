"""The simulated timeline of pipelined speculative decoding of one request: ``SpecHead`` (``exegpt.speculation``)
driven by a discrete-event loop over S target stages (FIFO servers), the hops between them, a drafter server and
an acceptance model. The runner (``runner.pipeinfer``) runs the same head on real tokens; this loop prices it.

  * the head computes stage 0 itself (a launch keeps it busy for stage 0's time), as the runner's rank 0 does;
    results and drafts that come in meanwhile wait for it, and are handled in arrival order;
  * a run of b tokens takes ``base + b * per_token`` seconds on a stage (a tree run of w branches: b is w times
    its longest branch, the padded micro-batch the stage computes); every message (a run to the next stage, the
    target tokens back to the head, a draft request and its reply, a cancellation) takes one hop;
  * a cancellation reaches a stage one hop after the head sent it: a queued cancelled run is skipped, the run in
    progress stops after its current layer (the stage's time is charged up to there);
  * the drafter serves requests in order, ``draft_s + n * draft_tok_s`` for n tokens drafted (every branch's);
  * acceptance: each drafted token is the target's with probability ``alpha`` (i.i.d.), and the drafter stops
    before each token with probability ``stop_p`` (its confidence under the cutoff; before the first one too).
    A tree of width w adds w - 1 siblings to a non-empty draft, parting from it at its first token: where the
    trunk's first token is wrong, each sibling in turn holds the target's token with probability ``rescue``
    (none does where the trunk's is right); after it, a sibling's tokens follow ``alpha`` and ``stop_p`` as the
    trunk's do;
  * KV: every stage keeps each cache row's length and how many of its leading positions hold the target's KV,
    and executes a run's row copies, its writes, the length reset before it and the rollback of an abort as the
    runner's stages do; the last stage returns the target's token after a position only where the row's KV up to
    it is right on every stage (else a wrong token, which the lossless check would see), and at the request's
    end every row on every stage must hold at least what the head believes it holds.
Tokens are symbolic: the target's token at position p is p.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .errors import ExeGPTError
from .spec_run import Run, SpecCounts
from .speculation import SpecHead, cache_rows, common_prefix


@dataclass(frozen=True, slots=True)
class SpecCosts:
    """What the timeline is priced with (seconds)."""

    stage_base_s: tuple[float, ...]
    """Per target stage: a run's fixed seconds (stage 0 on the head's rank; the last stage with the LM head)."""
    stage_tok_s: tuple[float, ...]
    """Per target stage: seconds per token of a run."""
    stage_layers: tuple[int, ...]
    """Per target stage: layers (the granularity of an abort)."""
    hop_s: float
    """One message between two ranks (latency; a run's hidden states add ``hop_tok_s`` per token)."""
    hop_tok_s: float = 0.0
    draft_s: float = 0.0
    """A draft request's fixed seconds on the drafter (catching up with the tokens it has not seen)."""
    draft_tok_s: float = 0.0
    """Seconds per drafted token."""

    def __post_init__(self):
        n = len(self.stage_base_s)
        if not n or len(self.stage_tok_s) != n or len(self.stage_layers) != n:
            raise ExeGPTError(f"SpecCosts: stage_base_s, stage_tok_s and stage_layers need one entry per stage, "
                              f"got {len(self.stage_base_s)}, {len(self.stage_tok_s)}, {len(self.stage_layers)}")
        for name in ("hop_s", "hop_tok_s", "draft_s", "draft_tok_s"):
            if not getattr(self, name) >= 0:
                raise ExeGPTError(f"SpecCosts: {name}={getattr(self, name)!r} must be >= 0 seconds")

    def stage_s(self, s: int, tokens: int) -> float:
        return self.stage_base_s[s] + tokens * self.stage_tok_s[s]

    def hop(self, tokens: int = 0) -> float:
        return self.hop_s + tokens * self.hop_tok_s


@dataclass(frozen=True, slots=True)
class Acceptance:
    """The acceptance model (module docstring): measured from runs of the same drafter and cutoff."""

    alpha: float
    stop_p: float = 0.0
    rescue: float = 0.0
    """Per sibling: the probability it holds the target's token where the trunk's first drafted token is wrong."""

    def __post_init__(self):
        for name in ("alpha", "stop_p", "rescue"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ExeGPTError(f"acceptance {name}={v!r} must be a probability in [0, 1]")


@dataclass(frozen=True, slots=True)
class SpecOptions:
    """The knobs the timeline reads (``exegpt.policies.pipeinfer.PipeInferSchedule`` carries them)."""

    mode: str
    n_draft: int = 4
    depth: int = 1
    width: int = 1


@dataclass(slots=True)
class RequestTimeline:
    """One simulated request: seconds from its start."""

    ttft_s: float
    token_s: list[float]
    """When each generated token was committed (the first is the prefill's)."""
    counts: SpecCounts
    tokens: list[int]
    """The generated tokens (symbolic: the target's are the positions)."""
    layers_computed: int = 0
    layers_aborted: int = 0
    """Layers a cancellation saved on runs it stopped mid-way or before they started."""
    rolled_back: tuple[int, ...] = ()
    """Per stage: KV positions rolled back (a row's length reset below what it held)."""
    kv_copies: int = 0
    """Row copies the stages executed (a cancelled run's skipped ones are not)."""


@dataclass
class _Stage:
    queue: deque = field(default_factory=deque)
    busy: tuple | None = None  # (run, start_s, end_s, token)
    cancelled: set = field(default_factory=set)
    rows: list = field(default_factory=list)
    """Per KV row: [length, leading positions whose KV is the target's]."""
    rolled_back: int = 0


PREFILL_ID = -1
WRONG = -10**9
"""What the last stage returns after a position whose KV is wrong on some stage (never a target token)."""


def simulate_request(costs: SpecCosts, acc: Acceptance, opts: SpecOptions, prompt_len: int, output_len: int,
                     rng: np.random.Generator) -> RequestTimeline:
    """The timeline of one request alone on the pipeline (module docstring)."""
    return _Timeline(costs, acc, opts, prompt_len, output_len, rng).run()


class _Timeline:
    def __init__(self, costs: SpecCosts, acc: Acceptance, opts: SpecOptions, prompt_len: int, output_len: int,
                 rng: np.random.Generator):
        self.c, self.acc, self.opts, self.rng = costs, acc, opts, rng
        # siblings draw from a stream of their own: the trunks are the same draws whatever the width
        self.sib_rng = np.random.default_rng(int(rng.integers(2**62)))
        self.prompt_len, self.output_len = prompt_len, output_len
        self.S = len(costs.stage_base_s)
        self.events: list = []
        self.seq = 0
        n_rows = cache_rows(opts.mode, opts.width, opts.depth)
        self.stages = [_Stage(rows=[[0, 0] for _ in range(n_rows)]) for _ in range(self.S)]
        self.ok: dict[int, list[int]] = {}  # run id -> per branch: positions right on every stage so far
        self.copies = 0
        self.inbox: deque = deque()
        self.head: SpecHead | None = None
        self.head_free = 0.0
        self.drafter_free = 0.0
        self.token_s: list[float] = []
        self.ttft = None
        self.layers = [0, 0]

    def push(self, t: float, kind: str, *data) -> None:
        heapq.heappush(self.events, (t, self.seq, kind, data))
        self.seq += 1

    def run(self) -> RequestTimeline:
        prefill = Run(PREFILL_ID, 0, tuple(range(self.prompt_len)), False)
        self.launch(prefill, 0.0)
        while self.events:
            t, _, kind, data = heapq.heappop(self.events)
            if kind == "arrive":
                self.stages[data[0]].queue.append(data[1])
                self.serve(data[0], t)
            elif kind == "done":
                self.finish(data[0], data[1], data[2], t)
            elif kind == "cancel":
                self.cancel_at(data[0], data[1], t)
            elif kind in ("result", "draft"):
                self.inbox.append((kind, data))
                self.head_step(t)
            elif kind == "head":
                self.head_step(t)
            if self.head is not None and self.head.done:
                break
        if self.head is None or not self.head.done:
            raise ExeGPTError("the simulated speculation timeline stalled before the request finished")
        self.check_rows()
        return RequestTimeline(self.ttft, self.token_s, self.head.counts, self.head.generated, *self.layers,
                               tuple(st.rolled_back for st in self.stages), self.copies)

    # --- the head ----------------------------------------------------------------------------------

    def head_step(self, t: float) -> None:
        """The head handles what is in its inbox once free, then launches what its state calls for."""
        if t < self.head_free:
            self.push(self.head_free, "head")
            return
        while self.inbox and self.head_free <= t:
            kind, data = self.inbox.popleft()
            if kind == "result":
                self.on_result(data[0], t)
            else:
                run = self.head.on_draft(data[0], data[1]) if self.head is not None else None
                if run is not None:
                    self.launch(run, t)
            t = max(t, self.head_free)
            self.act(t)
            t = max(t, self.head_free)
        if self.inbox:
            self.push(self.head_free, "head")

    def on_result(self, run: Run, t: float) -> None:
        ok = self.ok.pop(run.id)
        if run.id == PREFILL_ID:
            self.ttft = t
            self.token_s.append(t)
            self.head = SpecHead(tuple(range(self.prompt_len)), self.prompt_len, self.output_len, self.opts.mode,
                                 self.opts.depth, self.opts.width)
            return
        if self.head.done:
            return
        # the target's token after each fed position, where the KV up to it is right on every stage
        targets = [p + 1 if p < good else WRONG for b, good in zip(run.branches, ok)
                   for p in range(run.start, run.start + len(b))]
        committed, cancelled = self.head.on_result(run.id, targets)
        self.token_s += [t] * len(committed)
        if cancelled:
            ids = {r.id for r in cancelled}
            for s in range(1, self.S):
                self.push(t + self.c.hop(), "cancel", s, ids)

    def act(self, t: float) -> None:
        h = self.head
        if h is None or h.done:
            return
        run = h.plain_run()
        if run is not None:
            t = self.launch(run, t)
        if h.wants_draft():
            ask, chain, room = h.ask_draft()
            start = max(t + self.c.hop(), self.drafter_free)
            branches = self.draft(len(chain), min(room, self.opts.n_draft), self.opts.width)
            self.drafter_free = start + self.c.draft_s + sum(map(len, branches)) * self.c.draft_tok_s
            self.push(self.drafter_free + self.c.hop(), "draft", ask, branches)

    def draft(self, at: int, k: int, width: int = 1) -> list[list[int]]:
        """Branches of up to ``k`` tokens for positions ``at, at + 1, ...`` by the acceptance model (a wrong token
        is negative): the trunk, then ``width - 1`` siblings parting from it at its first token."""
        trunk = self._chain(at, 0, k)
        if not trunk:
            return []
        out, found = [trunk], trunk[0] == at
        for b in range(1, width):
            first = -1 - b  # wrong, and unlike the trunk's and the other siblings' first tokens
            if not found and self.sib_rng.random() < self.acc.rescue:
                first, found = at, True
            out.append([first] + self._chain(at, 1, k, self.sib_rng))
        return out

    def _chain(self, at: int, i: int, k: int, rng: np.random.Generator | None = None) -> list[int]:
        rng, out = rng or self.rng, []
        for i in range(i, k):
            if rng.random() < self.acc.stop_p:
                break
            out.append(at + i if rng.random() < self.acc.alpha else -1)
        return out

    def launch(self, run: Run, t: float) -> float:
        """Stage 0 computes ``run`` on the head's time; returns when the head is free again."""
        t0 = max(t, self.head_free)
        self.head_free = t0 + self.c.stage_s(0, run.padded)
        self.layers[0] += self.c.stage_layers[0]
        self.ok[run.id] = [len(b) + run.start for b in run.branches]
        self.compute_kv(0, run)
        self.forward(0, run, self.head_free)
        return self.head_free

    def forward(self, s: int, run: Run, t: float) -> None:
        if s + 1 < self.S:
            self.push(t + self.c.hop(run.fed), "arrive", s + 1, run)
        else:
            self.push(t + (self.c.hop() if self.S > 1 else 0.0), "result", run)

    # --- the stages' KV ------------------------------------------------------------------------------

    def compute_kv(self, s: int, run: Run) -> None:
        """Stage ``s`` starts computing ``run``: its row copies, then each branch row reset to the run's start and
        written; what is right in each branch's row joins the run's record."""
        st = self.stages[s]
        rows = st.rows
        for src, dst, a, b in run.copies:
            if rows[src][0] < b or rows[dst][0] < a:
                raise ExeGPTError(f"simulated stage {s}: run {run.id} copies positions [{a}, {b}) of row {src} "
                                  f"(holding {rows[src][0]}) to row {dst} (holding {rows[dst][0]})")
            st.rolled_back += rows[dst][0] - a
            good = rows[dst][1] if rows[dst][1] < a else max(a, min(rows[src][1], b))
            rows[dst] = [b, good]
            self.copies += 1
        ok = self.ok[run.id]
        for i, (r, br) in enumerate(zip(run.rows, run.branches)):
            n, good = rows[r]
            if n < run.start:
                raise ExeGPTError(f"simulated stage {s}: run {run.id} starts at {run.start} but row {r} holds {n}")
            if run.start > 0:
                st.rolled_back += n - run.start
            if good >= run.start:
                good = run.start + common_prefix(list(br), list(range(run.start, run.start + len(br))))
            rows[r] = [run.start + len(br), good]
            ok[i] = min(ok[i], good)

    def roll_back(self, s: int, run: Run) -> None:
        """An abort on stage ``s``: the run's rows back to its start."""
        st = self.stages[s]
        for r in run.rows:
            n, good = st.rows[r]
            st.rolled_back += max(0, n - run.start)
            st.rows[r] = [min(n, run.start), min(good, run.start)]

    def check_rows(self) -> None:
        """At the request's end: no row on any stage holds less than the head believes it does."""
        for s, st in enumerate(self.stages):
            for r, (n, good) in enumerate(st.rows):
                believed = self.head.row_tokens[r]
                right = common_prefix(believed, list(range(len(believed))))
                if n < len(believed) or good < right:
                    raise ExeGPTError(f"simulated stage {s}: row {r} holds {n} positions ({good} right) but the "
                                      f"head believes {len(believed)} ({right} right)")

    # --- the stages --------------------------------------------------------------------------------

    def serve(self, s: int, t: float) -> None:
        st = self.stages[s]
        while st.busy is None and st.queue:
            run = st.queue.popleft()
            if run.id in st.cancelled:  # skipped before it started
                self.layers[1] += self.c.stage_layers[s]
                continue
            self.compute_kv(s, run)
            end = t + self.c.stage_s(s, run.padded)
            st.busy = (run, t, end, self.seq)
            self.push(end, "done", s, run, st.busy[3])

    def finish(self, s: int, run: Run | None, token: int, t: float) -> None:
        st = self.stages[s]
        if st.busy is None or st.busy[3] != token:
            return  # an abort replaced this completion
        st.busy = None
        if run is not None:
            self.layers[0] += self.c.stage_layers[s]
            self.forward(s, run, t)
        self.serve(s, t)

    def cancel_at(self, s: int, ids: set, t: float) -> None:
        """The cancellation of runs ``ids`` reaches stage ``s``: the run in progress stops after its layer."""
        st = self.stages[s]
        st.cancelled |= ids
        if st.busy is None or st.busy[0] is None or st.busy[0].id not in ids:
            return
        run, start, end, _ = st.busy
        n = self.c.stage_layers[s]
        per_layer = (end - start) / n
        done = min(n, int(np.floor((t - start) / per_layer)) + 1) if per_layer > 0 else n
        self.layers[0] += done
        self.layers[1] += n - done
        if done < n:
            self.roll_back(s, run)
        stop = start + done * per_layer
        st.busy = (None, start, stop, self.seq)
        self.push(stop, "done", s, None, st.busy[3])
