"""The runs of pipelined speculative decoding and what a request's head counts (``exegpt.speculation``): a run's
tokens, its branches and the KV cache rows they are computed in, and the counts both engines report."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Run:
    id: int
    start: int
    """Position of the first token fed."""
    tokens: tuple[int, ...]
    """Branch 0 (the trunk: later runs continue it)."""
    spec: bool
    """Carries drafted tokens (else: the committed token alone)."""
    alts: tuple[tuple[int, ...], ...] = ()
    """Branches 1 .. w - 1 (the siblings of a tree run), from the same start."""
    rows: tuple[int, ...] = (0,)
    """The KV cache row of each branch."""
    copies: tuple[tuple[int, int, int, int], ...] = ()
    """(source row, destination row, a, b): KV positions [a, b) to copy before computing the run, in order."""

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)

    @property
    def branches(self) -> tuple[tuple[int, ...], ...]:
        return (self.tokens,) + self.alts

    @property
    def width(self) -> int:
        return 1 + len(self.alts)

    @property
    def fed(self) -> int:
        """Tokens fed, every branch's (the targets that come back, branch after branch)."""
        return len(self.tokens) + sum(len(b) for b in self.alts)

    @property
    def padded(self) -> int:
        """Tokens a stage computes: the micro-batch of ``width`` rows padded to the longest branch."""
        return self.width * max(len(b) for b in self.branches)

    def split(self, targets) -> list[list[int]]:
        """The flat targets of a run (branch after branch) per branch."""
        out, i = [], 0
        for b in self.branches:
            out.append([int(t) for t in targets[i:i + len(b)]])
            i += len(b)
        return out


@dataclass(slots=True)
class SpecCounts:
    """What one request's head counted."""

    runs: int = 0
    spec_runs: int = 0
    cancelled: int = 0
    """Runs cancelled in flight (their KV is rolled back on every row and stage that computed them)."""
    drafted: int = 0
    """Draft tokens sent to the target in runs (every branch's)."""
    verified: int = 0
    """Draft positions compared with the target's token, along the committed path (a cancelled run's are not)."""
    accepted: int = 0
    """Draft tokens committed (a sibling's included)."""
    drafts_dropped: int = 0
    """Drafts that came back after a cancellation made them stale."""
    fed_positions: int = 0
    tree_runs: int = 0
    """Runs with more than one branch."""
    siblings: int = 0
    """Branches after the first, over all runs."""
    forks: int = 0
    """Tree runs whose first drafted position was verified (where the branches part)."""
    fork_misses: int = 0
    """... of which the trunk's token there was wrong."""
    rescued: int = 0
    """... of which a sibling's was right (a rejection a sibling rescued)."""
    sibling_tries: int = 0
    """Siblings checked at fork misses, in order, up to the one that was right (the per-sibling rescue rate is
    ``rescued / sibling_tries``)."""
    copies: int = 0
    """KV copy operations (row to row) the runs carried."""
    copied: int = 0
    """KV positions they copied."""

    def add(self, other: SpecCounts) -> None:
        for f in self.__slots__:
            setattr(self, f, getattr(self, f) + getattr(other, f))

    @property
    def acceptance(self) -> float:
        """Accepted draft tokens per verified draft position (the greedy agreement rate, rescues included)."""
        return self.accepted / self.verified if self.verified else float("nan")

    @property
    def trunk_acceptance(self) -> float:
        """The agreement rate of the followed branch alone (the acceptance model's ``alpha``): rescues left out."""
        return (self.accepted - self.rescued) / self.verified if self.verified else float("nan")

    @property
    def rescue(self) -> float:
        """The probability a sibling holds the target's token where the trunk missed it, per sibling tried (the
        acceptance model's ``rescue``)."""
        return self.rescued / self.sibling_tries if self.sibling_tries else 0.0
