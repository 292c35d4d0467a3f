"""The simulated timeline of pipelined speculative decoding of one request: ``SpecHead`` (``exegpt.speculation``)
driven by a discrete-event loop over S target stages (FIFO servers), the hops between them, a drafter server and
an acceptance model. The runner (``runner.pipeinfer``) runs the same head on real tokens; this loop prices it.

  * the head computes stage 0 itself (a launch keeps it busy for stage 0's time), as the runner's rank 0 does;
    results and drafts that come in meanwhile wait for it, and are handled in arrival order;
  * a run of b tokens takes ``base + b * per_token`` seconds on a stage; every message (a run to the next stage,
    the target tokens back to the head, a draft request and its reply, a cancellation) takes one hop;
  * a cancellation reaches a stage one hop after the head sent it: a queued cancelled run is skipped, the run in
    progress stops after its current layer (the stage's time is charged up to there);
  * the drafter serves requests in order, ``draft_s + n * draft_tok_s`` for n tokens drafted;
  * acceptance: each drafted token is the target's with probability ``alpha`` (i.i.d.), and the drafter stops
    before each token with probability ``stop_p`` (its confidence under the cutoff; before the first one too).
Tokens are symbolic: the target's token at position p is p.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .errors import ExeGPTError
from .speculation import Run, SpecCounts, SpecHead


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

    def __post_init__(self):
        for name in ("alpha", "stop_p"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ExeGPTError(f"acceptance {name}={v!r} must be a probability in [0, 1]")


@dataclass(frozen=True, slots=True)
class SpecOptions:
    """The knobs the timeline reads (``exegpt.policies.pipeinfer.PipeInferSchedule`` carries them)."""

    mode: str
    n_draft: int = 4
    depth: int = 1


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


@dataclass
class _Stage:
    queue: deque = field(default_factory=deque)
    busy: tuple | None = None  # (run, start_s, end_s, token)
    cancelled: set = field(default_factory=set)


PREFILL_ID = -1


def simulate_request(costs: SpecCosts, acc: Acceptance, opts: SpecOptions, prompt_len: int, output_len: int,
                     rng: np.random.Generator) -> RequestTimeline:
    """The timeline of one request alone on the pipeline (module docstring)."""
    return _Timeline(costs, acc, opts, prompt_len, output_len, rng).run()


class _Timeline:
    def __init__(self, costs: SpecCosts, acc: Acceptance, opts: SpecOptions, prompt_len: int, output_len: int,
                 rng: np.random.Generator):
        self.c, self.acc, self.opts, self.rng = costs, acc, opts, rng
        self.prompt_len, self.output_len = prompt_len, output_len
        self.S = len(costs.stage_base_s)
        self.events: list = []
        self.seq = 0
        self.stages = [_Stage() for _ in range(self.S)]
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
        return RequestTimeline(self.ttft, self.token_s, self.head.counts, self.head.generated, *self.layers)

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
        targets = [p + 1 for p in range(run.start, run.end)]  # the target's token after each fed position
        if run.id == PREFILL_ID:
            self.ttft = t
            self.token_s.append(t)
            self.head = SpecHead(tuple(range(self.prompt_len)), self.prompt_len, self.output_len, self.opts.mode,
                                 self.opts.depth)
            return
        if self.head.done:
            return
        committed, cancelled = self.head.on_result(run.id, targets[-len(run.tokens):])
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
            tokens = self.draft(len(chain), min(room, self.opts.n_draft))
            self.drafter_free = start + self.c.draft_s + len(tokens) * self.c.draft_tok_s
            self.push(self.drafter_free + self.c.hop(), "draft", ask, tokens)

    def draft(self, at: int, k: int) -> list[int]:
        """Up to ``k`` tokens for positions ``at, at + 1, ...`` by the acceptance model (-1: a wrong token)."""
        out = []
        for i in range(k):
            if self.rng.random() < self.acc.stop_p:
                break
            out.append(at + i if self.rng.random() < self.acc.alpha else -1)
        return out

    def launch(self, run: Run, t: float) -> float:
        """Stage 0 computes ``run`` on the head's time; returns when the head is free again."""
        t0 = max(t, self.head_free)
        self.head_free = t0 + self.c.stage_s(0, len(run.tokens))
        self.layers[0] += self.c.stage_layers[0]
        self.forward(0, run, self.head_free)
        return self.head_free

    def forward(self, s: int, run: Run, t: float) -> None:
        if s + 1 < self.S:
            self.push(t + self.c.hop(len(run.tokens)), "arrive", s + 1, run)
        else:
            self.push(t + (self.c.hop() if self.S > 1 else 0.0), "result", run)

    # --- the stages --------------------------------------------------------------------------------

    def serve(self, s: int, t: float) -> None:
        st = self.stages[s]
        while st.busy is None and st.queue:
            run = st.queue.popleft()
            if run.id in st.cancelled:  # skipped before it started
                self.layers[1] += self.c.stage_layers[s]
                continue
            end = t + self.c.stage_s(s, len(run.tokens))
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
        stop = start + done * per_layer
        st.busy = (None, start, stop, self.seq)
        self.push(stop, "done", s, None, st.busy[3])
