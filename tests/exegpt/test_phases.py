"""Decode iterations an RRA phase runs (``exegpt.phases``): exact where the model is exact, close to a replay of
the runner's admission rule elsewhere, and monotone where the search needs it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from exegpt import RRASchedule, Workload, evaluate_schedule
from exegpt.cost import WorkloadStats
from exegpt.distribution import Distribution
from exegpt.phases import SEGMENTS, PhaseLengths, QueryRows, phases_per_query

from .conftest import make_profile


def _lengths(w: Workload) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    st = WorkloadStats.of(w)
    return st.k_lengths, st.k_probs, phases_per_query(st.k_lengths, st.k_probs)


def _replay(k: np.ndarray, p: np.ndarray, phases: np.ndarray, be: int, nd: int, n_queries: int = 60000,
            seed: int = 0) -> float:
    """Mean iterations per phase of the runner's RRA rule (``runner/rra.py``), lengths only: refill toward
    round(B_E E[ceil(k/N_D)]) with as many new queries as finished (B_E while ramping up), run until N_D
    iterations or an empty batch."""
    rng = np.random.default_rng(seed)
    queue = list(rng.choice(k, size=n_queries, p=p).astype(int))
    target = max(1, round(be * phases[nd]))
    rows = math.ceil(be * phases[nd]) + be
    alive: list[int] = []
    lengths = []
    while len(queue) > be:
        finished = len(alive) - sum(r > 0 for r in alive)
        alive = [r for r in alive if r > 0]
        n = min(max(be, finished), target - len(alive), rows - len(alive))
        alive += [queue.pop() for _ in range(max(n, 0))]
        alive = [r for r in alive if r > 0]
        if not alive:
            continue
        ran = min(nd, max(alive))
        lengths.append(ran)
        alive = [r - ran for r in alive]
    return float(np.mean(lengths[len(lengths) // 10:]))  # past the ramp-up


def test_phase_runs_nd_iterations_at_nd_1_and_the_longest_output_when_nd_exceeds_every_output():
    """N_D = 1: one iteration. N_D beyond every output: each query ends in its first phase, so the batch is the
    B_E fresh queries and the phase runs E[max of B_E decode iterations] (exact below SEGMENTS + 1 lengths)."""
    out = np.arange(2, SEGMENTS + 2)  # every query decodes (no output of one token), at most SEGMENTS iterations
    q = np.exp(-((out - 12) / 6) ** 2)
    w = Workload(Distribution.truncated_normal(16, 4, 32), Distribution.from_pmf(out, q / q.sum()))
    k, p, phases = _lengths(w)
    L = PhaseLengths(k, p, phases)
    K = len(phases) - 1
    for be in (1, 3, 8, 32):
        assert L(be, 1) == 1.0
        assert L(be, K) == pytest.approx(w.output_len.expected_max(be) - 1, rel=1e-12)


@pytest.mark.parametrize("be,nd", [(2, 60), (16, 40), (16, 63), (32, 79)])
def test_phase_length_matches_a_replay_of_the_runners_rule(be, nd):
    """Rows at a phase start are not quite independent; the model stays within 4 % of the replayed mean."""
    w = Workload.truncated_normal(input=(64, 63, 128), output=(32, 13, 80), name="S/4")
    k, p, phases = _lengths(w)
    model = float(PhaseLengths(k, p, phases)(be, nd))
    assert model <= nd
    assert model == pytest.approx(_replay(k, p, phases, be, nd), rel=0.04)


def test_phase_lengths_are_monotone_and_at_most_nd():
    """Non-decreasing in B_E and N_D (the search's box bounds rely on it), never above N_D."""
    k, p, phases = _lengths(Workload.task("C2"))
    table = PhaseLengths(k, p, phases).table(64)[1:, 1:]
    assert (np.diff(table, axis=0) >= 0).all() and (np.diff(table, axis=1) >= 0).all()
    assert (table <= np.arange(1, table.shape[1] + 1)[None, :] + 1e-9).all()
    assert table[:, -1].max() < table.shape[1]  # long N_D: phases end early


def test_rra_estimate_counts_the_iterations_a_phase_runs():
    """The estimate's decode batch is B_E E[k] / L (rows per iteration that runs), and its throughput
    B_E / (T_E + L T_D) at those rows: higher than with N_D full iterations once phases end early."""
    w = Workload.task("S")
    prof = make_profile()
    k, p, phases = _lengths(w)
    L = float(PhaseLengths(k, p, phases)(16, 70))
    e = evaluate_schedule(RRASchedule(16, 70, 1, 0, 1), w, math.inf, profile=prof, devices="1xA40").estimate
    assert L < 70
    assert e.decode_batch == pytest.approx(16 * float(np.dot(k, p)) / L)
    assert e.throughput_seq_s == pytest.approx(16 / (e.encode_stage_s + L * e.decode_step_s))


def _replay_query_rows(k: np.ndarray, p: np.ndarray, phases: np.ndarray, be: int, nd: int, k_q: int,
                       n_queries: int = 40000, seed: int = 1) -> float:
    """Mean rows beside which the queries of exactly ``k_q`` decode iterations ran theirs, under the runner's RRA
    rule (refill as many as finished, run until N_D iterations or an empty batch), lengths only."""
    rng = np.random.default_rng(seed)
    queue = list(rng.choice(k, size=n_queries, p=p).astype(int))
    target = max(1, round(be * phases[nd]))
    alive = np.zeros(0, dtype=int)
    mine = np.zeros(0, dtype=bool)  # a query of k_q iterations, admitted past the ramp-up
    seen, admitted = [], 0
    while len(queue) > target:
        done = alive <= 0
        finished = int(done.sum())
        alive, mine = alive[~done], mine[~done]
        n = min(max(be, finished), target - len(alive))
        new = np.array([queue.pop() for _ in range(max(n, 0))], dtype=int)
        admitted += len(new)
        alive = np.concatenate([alive, new])
        mine = np.concatenate([mine, (new == k_q) & (admitted > 4 * target)])
        if not len(alive) or alive.max() <= 0:
            continue
        ran = min(nd, int(alive.max()))
        for j in range(ran):
            runs = alive > j
            seen += [int(runs.sum())] * int((runs & mine).sum())
        alive = alive - ran
    return float(np.mean(seen))


@pytest.mark.parametrize("be,nd", [(4, 16), (8, 62), (16, 40)])
def test_query_rows_match_a_replay_of_the_runners_rule(be, nd):
    """The bound-length query decodes beside more rows than the phase's mean; the model is within 5 % of a
    replay, and its box bound never exceeds it."""
    w = Workload.truncated_normal(input=(64, 63, 128), output=(32, 13, 80), name="S/4")
    k, p, phases = _lengths(w)
    k_q = w.output_len.quantile(0.9) - 1
    q = QueryRows(k, p, phases, k_q)
    model = float(q.rows(be, nd))
    mean_rows = be * float(np.dot(k, p)) / float(PhaseLengths(k, p, phases)(be, nd))
    assert model > mean_rows
    assert model == pytest.approx(_replay_query_rows(k, p, phases, be, nd, k_q), rel=0.05)
    for lo, hi in [(nd, nd), (1, nd), (nd // 2, nd + 5)]:
        assert q.lower(be, lo, hi) <= min(q.rows(be, d) for d in range(lo, hi + 1)) + 1e-12
