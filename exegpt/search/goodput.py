"""Searching under the SLO forms the analytic estimate cannot check: (b) a share of requests finishing within a
bound, and (c) TTFT / TPOT percentiles under arrivals with goodput as the objective (``exegpt.slo``).

Both run on the simulated engine (``exegpt.sim``). Candidates come from the same spaces the branch and bound
searches (every policy, TP degree, device split and device count), on a geometric grid of each knob, and are
simulated best estimate first. The estimate's saturated throughput bounds what a schedule can reach (goodput is
a rate the schedule keeps up with), so a candidate is skipped once its estimate, times ``PRUNE_SLACK`` for the
estimate's own error, cannot beat the best found; under (c), a candidate is run first at the best goodput its policy
reached so far, and searched further only if it keeps the SLO there (one run instead of a bisection for most).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass

import numpy as np

from ..arrivals import Arrivals
from ..errors import ExeGPTError, InfeasibleBoundError
from ..plan import Plan, SearchStats, SLOCheck
from ..report import RunReport
from ..sim import run_simulated
from ..slo import CompletionSLO, RequestSLO

log = logging.getLogger(__name__)

MAX_REQUESTS = 20000
"""The most requests one simulated run of a goodput bisection serves."""
PRUNE_SLACK = 1.25
"""A candidate whose estimated saturated throughput times this cannot beat the best simulated value is skipped."""


@dataclass(frozen=True, slots=True)
class SimulatedSearch:
    """How the SLO forms (b) and (c) are searched on the simulated engine."""

    num_requests: int = 400
    """Requests each simulated run serves (at least)."""
    span_ttfts: float = 10.0
    """(c): a run at rate r serves at least ``span_ttfts * r * ttft_s`` requests (up to ``MAX_REQUESTS``), so its
    arrivals span that many TTFT bounds: a rate the schedule cannot keep up with builds a queue longer than the
    bound within the run (with too few requests, even an overload ends before any TTFT grows past the bound)."""
    grid_points: int = 8
    """Values of each knob tried (geometric from its least to its largest)."""
    max_simulated: int = 24
    """Candidates simulated at most (best estimate first)."""
    rate_tolerance: float = 0.02
    """(c): the goodput bisection stops when its bracket is this narrow (relative)."""
    arrivals: str = "poisson"
    """(c): how requests arrive at each rate tried: 'poisson', or 'trace': the workload's own timestamps, its
    requests in trace order, sped up or slowed down to the rate (a rate is the trace's mean rate times the
    speed-up)."""
    seed: int = 0

    def __post_init__(self):
        for f in ("num_requests", "grid_points", "max_simulated"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < (2 if f == "grid_points" else 1):
                raise ExeGPTError(f"{f}={v!r} must be a whole number >= {2 if f == 'grid_points' else 1}")
        if self.arrivals not in ("poisson", "trace"):
            raise ExeGPTError(f"arrivals={self.arrivals!r} must be 'poisson' or 'trace'")
        if not self.span_ttfts > 0:
            raise ExeGPTError(f"span_ttfts={self.span_ttfts!r} must be > 0")
        if not 0 < self.rate_tolerance < 1:
            raise ExeGPTError(f"rate_tolerance={self.rate_tolerance!r} must be in (0, 1)")


def goodput(plan: Plan, slo: RequestSLO, profile=None, options: SimulatedSearch = SimulatedSearch(),
            holds_at: tuple[float, RunReport] | None = None) -> tuple[float, RunReport | None]:
    """The highest Poisson arrival rate (requests/s) at which ``plan`` keeps ``slo`` on the simulated engine, and
    the run at that rate (0 and None when even a trickle of requests misses it). Bisection between a rate that
    holds and one that does not, starting from the plan's estimated saturated throughput, or above ``holds_at``
    (a rate and its run known to keep the SLO)."""
    cap = plan.estimate.throughput_seq_s
    if not cap > 0 or not math.isfinite(cap):
        raise ExeGPTError(f"plan has no finite estimated throughput ({cap!r}) to search a rate around")

    lo, lo_rep = holds_at if holds_at is not None else (0.0, None)
    hi = cap if cap > lo else 2 * lo
    rep = run_at(plan, slo, hi, profile, options)
    while slo.holds(rep):  # keeps up even at the estimated capacity: look higher
        lo, lo_rep = hi, rep
        if hi > 16 * cap:
            return lo, lo_rep
        hi *= 2
        rep = run_at(plan, slo, hi, profile, options)
    while lo == 0.0:  # misses at its capacity: step down by 4x to a rate that holds, or give up at a trickle
        if hi <= cap / 64:
            return 0.0, None
        rate = hi / 4
        rep = run_at(plan, slo, rate, profile, options)
        if slo.holds(rep):
            lo, lo_rep = rate, rep
        else:
            hi = rate
    while hi - lo > options.rate_tolerance * hi:
        mid = (lo + hi) / 2
        rep = run_at(plan, slo, mid, profile, options)
        if slo.holds(rep):
            lo, lo_rep = mid, rep
        else:
            hi = mid
    return lo, lo_rep


def run_at(plan: Plan, slo: RequestSLO, rate: float, profile, options: SimulatedSearch) -> RunReport:
    """One simulated run of ``plan`` with requests arriving at ``rate`` (requests/s), long enough for an overload
    to show in TTFT (``SimulatedSearch.span_ttfts``)."""
    n = max(options.num_requests, min(MAX_REQUESTS, math.ceil(options.span_ttfts * rate * slo.ttft_s)))
    if options.arrivals == "trace":
        speedup = rate / _trace_rate(plan.workload)
        return run_simulated(plan, profile, min(n, len(plan.workload.pairs)), options.seed,
                             arrivals=Arrivals.trace(speedup))
    return run_simulated(plan, profile, n, options.seed, arrivals=Arrivals.poisson(rate))


def _trace_rate(w) -> float:
    """A trace's mean arrival rate (requests/s)."""
    if w.arrivals_s is None or len(w.arrivals_s) < 2:
        raise ExeGPTError(f"workload {w.name!r} has no timestamps to replay; use arrivals='poisson'")
    span = max(w.arrivals_s) - min(w.arrivals_s)
    if not span > 0:
        raise ExeGPTError(f"the timestamps of {w.name!r} span no time")
    return (len(w.arrivals_s) - 1) / span


def search_simulated(cands: list, slo: CompletionSLO | RequestSLO, profile, options: SimulatedSearch,
                     t0: float) -> Plan:
    """The best of ``cands`` under ``slo`` on the simulated engine: (estimated throughput, policy, make_plan)
    triples, ``make_plan(stats)`` building the candidate's Plan (``optimize.simulated_candidates``)."""
    cands = sorted(cands, key=lambda c: -c[0])
    if not cands:
        raise InfeasibleBoundError("no schedule fits in device memory (or in the profiled range) for this workload",
                                   math.inf)
    best: tuple[float, Plan, SLOCheck] | None = None
    closest: tuple[float, tuple[float, ...]] | None = None  # the smallest miss seen, for the error
    simulated = 0
    reached = {policy: 0.0 for _, policy, _ in cands}  # the best value each policy reached (0: none kept the SLO)
    for thr_est, policy, make_plan in cands:
        if simulated >= options.max_simulated:
            break
        if best is not None and thr_est * PRUNE_SLACK <= best[0]:
            break  # sorted by estimate: no later candidate can beat the best either
        plan = make_plan(SearchStats("simulated", simulated, 0.0))
        simulated += 1
        holds_at = None
        if reached[policy] > 0 and isinstance(slo, RequestSLO):  # one run at its policy's best rate so far
            rate = reached[policy] * (1 + options.rate_tolerance)  # decides whether the candidate can beat it
            rep = run_at(plan, slo, rate, profile, options)
            if not slo.holds(rep):
                continue
            holds_at = (rate, rep)
        value, check = _evaluate(plan, slo, profile, options, holds_at)
        if check.holds:
            reached[policy] = max(reached[policy], value)
        if check.holds and (best is None or value > best[0]):
            best = (value, plan, check)
        elif not check.holds and (closest is None or check.margin > closest[0]):
            closest = (check.margin, check.achieved)
    if best is None:
        raise _infeasible(slo, closest, simulated)
    value, plan, check = best
    stats = SearchStats("simulated", simulated, time.perf_counter() - t0, len(cands),
                        per_policy=tuple(sorted(reached.items())))
    return dataclasses.replace(plan, search=stats, slo=slo, slo_check=check)


def _evaluate(plan: Plan, slo, profile, options: SimulatedSearch, holds_at=None) -> tuple[float, SLOCheck]:
    """(the value to maximise, the check) of one plan: (b) its simulated throughput at saturation if it keeps the
    bound; (c) its goodput (searched above ``holds_at``, a rate and run known to keep it)."""
    if isinstance(slo, CompletionSLO):
        rep = run_simulated(plan, profile, options.num_requests, options.seed)
        check = SLOCheck("completion", slo.describe(), slo.holds(rep), slo.margin(rep), (slo.achieved(rep),),
                         engine="simulated", num_requests=options.num_requests)
        return rep.throughput_seq_s, check
    rate, rep = goodput(plan, slo, profile, options, holds_at)
    if rep is None:  # misses even at a trickle: report that run
        rep = run_simulated(plan, profile, options.num_requests, options.seed,
                            arrivals=Arrivals.poisson(plan.estimate.throughput_seq_s / 64))
        return 0.0, SLOCheck("request", slo.describe(), False, slo.margin(rep), slo.achieved(rep), 0.0,
                             "simulated", rep.num_requests)
    return rate, SLOCheck("request", slo.describe(), True, slo.margin(rep), slo.achieved(rep), rate, "simulated",
                          rep.num_requests)


def grid_points(space, k: int) -> list[tuple[int, ...]]:
    """A geometric grid of ``k`` values per axis of a search space (its feasible points, by its box function)."""
    axes = [np.unique(np.round(np.geomspace(lo, hi, k)).astype(np.int64)) for lo, hi in zip(space.lo, space.hi)]
    pts = np.stack([a.ravel() for a in np.meshgrid(*axes, indexing="ij")], axis=1)
    thr, _, ok = space.fn(pts, pts)
    thr, ok = (np.broadcast_to(np.asarray(a), (len(pts),)) for a in (thr, ok))
    if space.admissible is not None:
        ok = ok & space.admissible(pts, pts)
    return [(float(t), tuple(int(x) for x in p)) for t, p, o in zip(thr, pts, ok) if o and t > 0]


def _infeasible(slo, closest, simulated: int) -> InfeasibleBoundError:
    if closest is None:
        return InfeasibleBoundError(f"{slo.describe()}: no schedule could be simulated", math.inf)
    if isinstance(slo, CompletionSLO):
        reach = closest[1][0]
        return InfeasibleBoundError(
            f"{slo.describe()} is infeasible: of the {simulated} schedules simulated, the closest keeps "
            f"{slo.share:.0%} of requests within {reach:.4g} s", reach)
    ttft, tpot = closest[1]
    return InfeasibleBoundError(
        f"{slo.describe()} is infeasible even at a trickle of requests: of the {simulated} schedules simulated, "
        f"the closest reaches p{slo.percentile:g} TTFT {ttft:.4g} s and TPOT {tpot:.4g} s", max(ttft, tpot))
