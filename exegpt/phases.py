"""RRA decode phases: how many decode iterations a phase really runs.

An RRA phase runs N_D decode iterations, or fewer when every row of its batch finishes before that: the runner
ends the phase as soon as its batch is empty, and the next encode phase starts (``runner/rra.py``). With N_D
near or above the typical output length, which is what a loose bound makes the search pick, that happens in most
phases. Counting N_D iterations there over-predicts the decode time of a phase and under-predicts the rows of
each iteration (measured on the CPU runner: decode batch 1.17x the prediction, throughput 10-14 % above it, for
N_D = 63-138 on outputs of 32-64 tokens on average).

The model (our reading of the runner; the paper counts N_D iterations). At a phase start the batch holds n rows,
the refill batch B_E * E[ceil(k/N_D)]. A row's iterations in this phase are R = N_D unless the query ends in this
phase, and then its remainder k - (ceil(k/N_D) - 1) N_D. Rows are weighted by the phases they spend in the batch
(the length-biased mix of ``simulate``), so for r < N_D

    P(R <= r) = F(r) = sum_k p(k) [remainder_k <= r] / E[ceil(k/N_D)],

and, treating the rows as independent, the phase runs L = E[min(N_D, max_i R_i)] = N_D - sum_{r=1}^{N_D-1}
F(r)^n iterations. The sum is taken over at most ``SEGMENTS`` groups of consecutive r, each at the F of its
last r (an upper bound of F on the group, so L is never over-estimated); below that many r it is exact.

``PhaseLengths.table(B)[b, d]`` is L at B_E = b, N_D = d, made non-decreasing in N_D by a running maximum (L is
non-decreasing in B_E by construction, and at most N_D), so that the search's box bounds stay sound.
"""

from __future__ import annotations

import numpy as np

SEGMENTS = 32
"""Groups of consecutive r the sum over r is taken in, per N_D."""


def phases_per_query(k: np.ndarray, p: np.ndarray) -> np.ndarray:
    """``phases[d]`` = E[ceil(k / d)] for d = 1..max k (index 0 unused): the RRA phases a query of ``k`` decode
    iterations (probabilities ``p``) spends in the decode batch at N_D = d."""
    d = np.arange(1, max(int(k.max()), 1) + 1)
    phases = np.zeros(len(d) + 1)
    phases[1:] = (p[None, :] * np.ceil(k[None, :] / d[:, None])).sum(axis=1)
    return phases


def _live(k: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The queries that decode at all (a query of 0 decode iterations never joins a decode batch)."""
    live = k >= 1
    return k[live].astype(np.int64), p[live]


def _row_cdf(k: np.ndarray, p: np.ndarray, phases: np.ndarray, d: int) -> np.ndarray:
    """F[r] = P(R <= r) for r = 0..d-1 at N_D = d: a row of the length-biased mix runs R iterations in a phase, N_D
    or, in its query's last phase, the remainder (``k``, ``p`` from ``_live``)."""
    rem = k - (np.ceil(k / d).astype(np.int64) - 1) * d  # in [1, d]
    return np.cumsum(np.bincount(rem, weights=p, minlength=d + 1)[:d]) / phases[d]


class PhaseLengths:
    """Expected decode iterations per RRA phase, for every N_D up to the longest output's iterations. Built on
    first use (WAA and static searches never need it)."""

    def __init__(self, k: np.ndarray, p: np.ndarray, phases: np.ndarray):
        """``k``, ``p``: decode iterations per query and their probabilities; ``phases`` = ``phases_per_query``."""
        self.k, self.p, self.phases = k, p, phases
        self._table = np.zeros((1, len(phases)))

    def _tails(self) -> tuple[np.ndarray, np.ndarray]:
        """F at each group's last r and the integer r's each group stands for, ``[K + 1, SEGMENTS]`` each (0 where
        unused)."""
        K = len(self.phases) - 1
        F_end, W = np.zeros((K + 1, SEGMENTS)), np.zeros((K + 1, SEGMENTS))
        k, p = _live(self.k, self.p)
        for d in range(2, K + 1):
            if self.phases[d] <= 0:
                continue
            F = _row_cdf(k, p, self.phases, d)
            ends = np.unique(np.linspace(0, d - 1, SEGMENTS + 1).round().astype(np.int64))[1:]  # last r of groups
            F_end[d, :len(ends)] = F[ends]
            W[d, :len(ends)] = np.diff(np.concatenate([[0], ends]))
        return F_end, W

    def table(self, max_batch: int) -> np.ndarray:
        """``[max_batch + 1, K + 1]``: L at (B_E, N_D) (row 0 and column 0 unused), non-decreasing in N_D."""
        if self._table.shape[0] <= max_batch:
            F, W = self._tails()
            d = np.arange(len(self.phases), dtype=float)
            L = np.empty((max_batch + 1, len(d)))
            for b0 in range(0, max_batch + 1, 16):  # [16, K, SEGMENTS] at a time
                n = np.arange(b0, min(b0 + 16, max_batch + 1))[:, None] * self.phases[None, :]  # rows at a phase start
                tail = (W[None] * F[None] ** n[..., None]).sum(axis=-1)
                L[b0:b0 + len(n)] = np.where(n > 0, d[None, :] - tail, d[None, :])
            self._table = np.maximum.accumulate(L, axis=1)
        return self._table

    def __call__(self, be, nd) -> np.ndarray:
        """L at encode batches ``be`` and N_D ``nd`` (whole numbers, broadcast)."""
        be = np.asarray(be).astype(np.int64)
        nd = np.asarray(nd).astype(np.int64)
        return self.table(int(be.max()))[be, nd]


class QueryRows:
    """The rows a query of ``k_q`` decode iterations decodes beside, per N_D: a long query lives through the first
    iterations of its phases, when the batch is fullest (it shrinks as rows finish), so its iterations are
    heavier than the phase's mean (measured on the CPU runner: the bound-length output's latency 1.1-1.5x a
    prediction at the mean step, for N_D = 62-133).

    At N_D = d a row of the refill batch (n = B_E E[ceil(k/d)] rows, the length-biased mix) still runs at
    iteration j < d of a phase with probability S(j) = 1 - F(j) (``PhaseLengths``' F, exact here). The query runs
    iterations 0..d-1 in each of its ceil(k_q/d) - 1 full phases and 0..rem-1 in its last, so it decodes beside
    1 + (n - 1) m(d) rows on average, m(d) = [(ceil(k_q/d) - 1) A(d) + A(rem)] / k_q with A(t) = sum_{j<t} S(j).

    ``rows(be, nd)`` is that mean; ``lower(be, nd_lo, nd_hi)`` = max(1, B_E g) with g the least E[ceil(k/d)] m(d)
    over d in [nd_lo, nd_hi] (a sparse table of range minima), a lower bound of ``rows`` over the box, since
    1 + (n - 1) m = B_E g(d) + 1 - m >= B_E g(d)."""

    def __init__(self, k: np.ndarray, p: np.ndarray, phases: np.ndarray, k_q: int):
        K = len(phases) - 1
        self.m = np.zeros(K + 1)
        k, p = _live(k, p)
        if k_q >= 1:
            for d in range(1, K + 1):
                if phases[d] <= 0:
                    continue
                A = np.concatenate([[0.0], np.cumsum(1 - _row_cdf(k, p, phases, d))])  # A[t] = sum_{j<t} S(j)
                full = -(-k_q // d) - 1
                self.m[d] = (full * A[d] + A[k_q - full * d]) / k_q
        self.phases = phases
        g = phases * self.m
        self._min = [g]  # sparse table: _min[i][d] = min g over [d, d + 2^i)
        while 2 ** len(self._min) <= K + 1:
            h, prev = 2 ** (len(self._min) - 1), self._min[-1]
            self._min.append(np.minimum(prev, np.concatenate([prev[h:], np.full(h, np.inf)])))
        self._min = np.stack(self._min)

    def rows(self, be, nd) -> np.ndarray:
        nd = np.asarray(nd).astype(np.int64)
        n = np.asarray(be, float) * self.phases[nd]
        return np.maximum(1.0, 1 + (n - 1) * self.m[nd])

    def lower(self, be, nd_lo, nd_hi) -> np.ndarray:
        lo, hi = np.asarray(nd_lo).astype(np.int64), np.asarray(nd_hi).astype(np.int64)
        lvl = np.floor(np.log2(hi - lo + 1)).astype(np.int64)
        g = np.minimum(self._min[lvl, lo], self._min[lvl, hi - (1 << lvl) + 1])
        return np.maximum(1.0, np.asarray(be, float) * g)
