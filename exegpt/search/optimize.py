"""find_schedule: the outer loops (policy x TP degree x TP devices x GPU split) around the search.

Reads top to bottom: resolve the problem (model, devices, profile, workload, bound), enumerate the
device layouts of each policy, turn each into a search space, run one branch and bound over all of
them, and return the best ``Plan``. ``exhaustive_schedule`` evaluates every point of the same
spaces, so the two can be compared exactly.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass

import numpy as np

from ..checks import number
from ..errors import ExeGPTError, InfeasibleBoundError
from ..memory import MEMORY_FRACTION
from ..plan import Plan, SearchStats, SLOCheck
from ..policies import Schedule, policy_module
from ..policies.static import StaticSchedule, baseline_layout, points
from ..problem import Problem, problem
from ..profile import Profile
from ..schedule import Policy, policy_of
from ..simulate import estimate, layout_for
from ..slo import CompletionSLO, RequestSLO
from ..stages import Layout
from ..workload import Workload
from .bnb import SearchResult, Space, branch_and_bound, exhaustive
from .goodput import SimulatedSearch, grid_points, search_simulated

log = logging.getLogger(__name__)

BOX_POLICIES = (Policy.RRA, Policy.WAA_C, Policy.WAA_M)
"""The policies with a sound box bound (the paper's; their search is exact)."""
ALL_POLICIES = BOX_POLICIES + (Policy.CB, Policy.CHUNKED, Policy.DISAGG, Policy.SHIFT, Policy.SPLITWISER)
"""Searched by default under every SLO form: every policy but static batching (the paper's baseline), PipeInfer
(one request at a time: ``exegpt.policies.pipeinfer.best_schedule``) and BlendServe (offline pools with prompt
token ids); Splitwiser where a plan has one device. Under the paper's bound the box policies exactly, the others
on a grid of their estimates, and under forms (b) and (c) on the simulated engine."""
VERIFY_ATTEMPTS = 6
"""Searches ``find_schedule(verify_requests=...)`` runs at most: each one whose pick's replay misses the bound is
followed by one below that pick's estimate by the ratio of the bound to the replayed worst latency."""


@dataclass(frozen=True)
class SearchSpace:
    """Limits of the integer boxes searched."""

    max_encode_batch: int = 256
    """Largest B_E considered."""
    max_micro_batch: int = 256
    """Largest WAA decode micro-batch B_m considered."""
    waa_split: str = "auto"
    """How WAA splits the devices between its encode and decode groups: 'rule', the paper's (the floor or ceiling of
    the compute share for WAA-C, of the memory share for WAA-M, at each B_E); 'searched', every split for every
    B_E (WAA-C and WAA-M are then the same space), so that a forced device count gets the best split it allows;
    'auto': searched where the device counts are given (``device_counts``: a user who must use them), the rule
    where every count is searched (the counts the rule leaves idle are searched instead)."""

    def __post_init__(self):
        for f in ("max_encode_batch", "max_micro_batch"):
            if int(getattr(self, f)) != getattr(self, f) or getattr(self, f) < 1:
                raise ExeGPTError(f"{f}={getattr(self, f)!r} must be an integer >= 1")
        if self.waa_split not in ("auto", "rule", "searched"):
            raise ExeGPTError(f"waa_split={self.waa_split!r} must be 'auto', 'rule' or 'searched'")


# --- layouts and spaces -----------------------------------------------------------------------

def _tp_degrees(prob: Problem, tp_degrees) -> list[int]:
    n = prob.cluster.count
    if tp_degrees is None:
        return [t for t in prob.profile.tp_degrees() if t <= n and prob.model.valid_tp(t)
                and prob.profile.supports_tp(t)]
    out = []
    for t in tp_degrees:
        if int(t) != t or t < 1:
            raise ExeGPTError(f"TP degree {t!r} must be an integer >= 1")
        if t > n:
            raise ExeGPTError(f"TP degree {t} exceeds the {n} devices of {prob.cluster.label}")
        if (why := prob.tp_problem(int(t))) is not None:
            raise ExeGPTError(why)
        out.append(int(t))
    return sorted(set(out))


def build_spaces(prob: Problem, policies=BOX_POLICIES, tp_degrees=None,
                 space: SearchSpace = SearchSpace()) -> list[tuple[Layout, Space]]:
    """One search space per device layout of every requested policy (each policy module builds its own)."""
    tps = _tp_degrees(prob, tp_degrees)
    policies = [policy_of(p) for p in (BOX_POLICIES if policies is None else policies)]
    out: list[tuple[Layout, Space]] = []
    for policy in policies:
        out += policy_module(policy).spaces(prob, policy, tps, space)
    if not out:
        raise ExeGPTError(f"{prob.model.name} does not fit on {prob.cluster.label} under any of the policies "
                          f"{[p.value for p in policies]} (weights exceed device memory?)")
    return out


def simulated_candidates(prob: Problem, policies, tp_degrees, space: SearchSpace, device_counts, grid: int
                         ) -> list[tuple[float, str, object]]:
    """(estimated throughput, policy, make_plan) of a grid of every policy's schedules for the simulated search:
    box policies on a geometric grid of their spaces, the others by their own ``candidates``."""
    policies = [policy_of(p) for p in policies]
    boxed = [p for p in policies if not hasattr(policy_module(p), "candidates")]
    gridded = [p for p in policies if hasattr(policy_module(p), "candidates")]
    out: list = []
    try:
        layouts = all_spaces(prob, boxed, tp_degrees, space, device_counts) if boxed else []
    except ExeGPTError:
        if not gridded:
            raise
        layouts = []  # nothing of the box policies fits: the others may
    for sub, lay, sp in layouts:
        for thr, point in grid_points(sp, grid):
            s = _schedule(lay, point, sub.cluster.count)
            out.append((thr, lay.policy.value, (lambda sub, lay, s: lambda st: _plan(sub, lay, s, st))(sub, lay, s)))
    for c in _device_counts(prob, device_counts):
        sub = prob if c == prob.cluster.count else prob.with_devices(c)
        tps = [t for t in _tp_degrees(sub, None) if tp_degrees is None or t in tp_degrees]
        for policy in gridded:
            module = policy_module(policy)
            for s in module.candidates(sub, tps, grid):
                lay = module.layout(sub, s)
                if lay is None:
                    continue
                try:
                    plan = _plan(sub, lay, s, SearchStats("simulated", 0, 0.0))
                except ExeGPTError:
                    continue  # e.g. a token budget the workload's longest request exceeds
                if plan.estimate.memory_ok and plan.estimate.throughput_seq_s > 0:
                    out.append((plan.estimate.throughput_seq_s, policy.value,
                                (lambda p: lambda st: dataclasses.replace(p, search=st))(plan)))
    return out


def _schedule(lay: Layout, point: tuple[int, ...], n: int) -> Schedule:
    return policy_module(lay.policy).schedule_at(lay, point, n)


def _plan(prob: Problem, lay: Layout, s: Schedule, stats: SearchStats) -> Plan:
    est = estimate(prob, lay, s)
    b = prob.bound
    check = SLOCheck("quantile_length", f"the p{b.length_quantile * 100:g}-length output ({est.latency_len} tokens) "
                     f"within {b.bound_s:g} s", est.latency_s <= b.bound_s,
                     (b.bound_s - est.latency_s) / b.bound_s if math.isfinite(b.bound_s) else math.inf,
                     (est.latency_s,))
    return Plan(schedule=s, estimate=est, bound=b, profile_id=prob.profile.id, model=prob.model.name,
                devices=prob.cluster.label, workload=prob.workload, stages=lay.stages, search=stats, slo_check=check)


def _infeasible(prob: Problem, latency: float, margin: float = 0.0, how: str = "") -> InfeasibleBoundError:
    """The error naming the smallest feasible bound: ``latency``, the lowest any schedule reaches (inf: none fits),
    over ``1 - margin``; ``how`` says where it was read when not from the estimate."""
    if not math.isfinite(latency):
        return InfeasibleBoundError(
            f"no schedule of {prob.model.name} on {prob.cluster.label} fits in device memory (or in the "
            f"profiled range) for this workload", math.inf)
    q = prob.bound.length_quantile
    smallest = latency / (1 - margin)
    return InfeasibleBoundError(
        f"latency bound {prob.bound.bound_s:g} s is infeasible for the p{q * 100:g}-length output "
        f"({prob.latency_len} tokens) of {prob.model.name} on {prob.cluster.label}; the smallest feasible "
        f"bound is {smallest:.4g} s{how}" + (f" (with a {margin:.0%} latency margin)" if margin else ""), smallest)


def _device_counts(prob: Problem, device_counts) -> list[int]:
    """The device counts to plan for: every count from 1 to the cluster's (None), or those given."""
    n = prob.cluster.count
    if device_counts is None:
        return list(range(1, n + 1))
    counts = list(device_counts) if not isinstance(device_counts, (int, str)) else [device_counts]
    for c in counts:
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 1 <= c <= n:
            raise ExeGPTError(f"device count {c!r} must be an integer in [1, {n}] (the devices of "
                              f"{prob.cluster.label})")
    if not counts:
        raise ExeGPTError(f"device_counts is empty; expected counts in [1, {n}] or None (all of them)")
    return sorted(set(int(c) for c in counts))


def all_spaces(prob: Problem, policies=BOX_POLICIES, tp_degrees=None, space: SearchSpace = SearchSpace(),
               device_counts=None) -> list[tuple[Problem, Layout, Space]]:
    """``build_spaces`` for the cluster and for each smaller device count planned (``device_counts``): a schedule
    may leave devices idle when using them all would be slower (a small model on two CPU ranks: the pipeline's
    messages cost more than the second rank adds). Counts that fit no layout are skipped, as are requested TP
    degrees above a count; if no count fits, the error of the largest count is raised."""
    out, errors = [], {}
    n = prob.cluster.count
    if space.waa_split == "auto":
        space = dataclasses.replace(space, waa_split="rule" if device_counts is None else "searched")
    for c in _device_counts(prob, device_counts):
        sub = prob if c == n else prob.with_devices(c)
        tps = tp_degrees
        if tp_degrees is not None and c < n:  # a degree above a smaller count is not an error there
            tps = [t for t in tp_degrees if not (isinstance(t, (int, float, np.integer)) and t > c)]
            if not tps:
                continue
        try:
            out += [(sub, lay, sp) for lay, sp in build_spaces(sub, policies, tps, space)]
        except ExeGPTError as e:  # e.g. the weights do not fit on fewer devices
            errors[c] = e
    if not out:
        raise errors[max(errors)] if errors else ExeGPTError(
            f"no device count {device_counts!r} of {prob.cluster.label} admits the TP degrees {tp_degrees!r}")
    return out


@dataclass(frozen=True)
class SearchOptions:
    """How ``find_schedule`` searches (its keyword arguments; see there)."""

    method: str = "branch_and_bound"
    """'branch_and_bound' or 'exhaustive'."""
    policies: tuple = BOX_POLICIES
    tp_degrees: tuple | None = None
    eps_throughput: float = 0.0
    eps_latency: float = 0.0
    space: SearchSpace = SearchSpace()
    memory_fraction: float = MEMORY_FRACTION
    latency_margin: float = 0.0
    device_counts: tuple | int | None = None
    verify_requests: int = 0
    per_policy: bool = False
    """Also each policy's own best (``plan.search.per_policy``): one branch and bound per box policy."""

    def __post_init__(self):
        number(self.latency_margin, "latency_margin", 0, 1)
        if self.latency_margin == 1:
            raise ExeGPTError(f"latency_margin {self.latency_margin!r} must be in [0, 1) (the share of the bound held "
                              "back)")
        v = self.verify_requests
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ExeGPTError(f"verify_requests={v!r} must be a whole number >= 0 (0: no replay)")
        number(self.eps_throughput, "eps_throughput", lo=0)
        number(self.eps_latency, "eps_latency", lo=0)


def _solve(dist, slo, target: dict, opts: SearchOptions) -> Plan:
    """The search of ``opts`` for ``dist`` under ``slo`` on ``target`` (model, devices, profile): the branch and
    bound over the policies with a box bound, a grid of the others' estimates, the better of the two."""
    t0 = time.perf_counter()
    prob = problem(dist, slo, **target, memory_fraction=opts.memory_fraction)
    policies = [policy_of(p) for p in opts.policies]
    gridded = [p for p in policies if _gridded(p)]
    boxed = [p for p in policies if p not in gridded]
    best, error, reached = None, None, {}
    if boxed:
        try:
            # Each box policy's own best (one branch and bound apiece) when asked for: the portfolio's report.
            # Else one branch and bound over them all, each policy's spaces pruned by the others' incumbent.
            best, reached = _solve_boxed(prob, boxed, opts, target["profile"], t0,
                                         len(boxed) > 1 and opts.per_policy and opts.method != "exhaustive")
        except ExeGPTError as e:  # nothing of the box policies fits or meets the bound: the grid may
            if not gridded:
                raise
            error = e
    if gridded:
        box = best.search if best is not None else None
        best, grid_reached, error, graded = _best_gridded(prob, gridded, opts, target["profile"], best, error)
        reached.update(grid_reached)
        if best is not None:  # the search's statistics: the branch and bound's and the grid's together
            stats = box or SearchStats(opts.method, 0, 0.0)
            best = dataclasses.replace(best, search=dataclasses.replace(
                best.search, method=f"{stats.method} + grid" if box else "grid",
                candidates_evaluated=stats.candidates_evaluated + graded, space_size=stats.space_size + graded,
                boxes_pruned=stats.boxes_pruned))
    if best is None:
        raise error
    best = dataclasses.replace(best, search=dataclasses.replace(
        best.search, wall_s=time.perf_counter() - t0,
        per_policy=tuple(sorted(reached.items())) if len(policies) > 1 and opts.per_policy else ()))
    return best


def _gridded(policy: Policy) -> bool:
    """Whether a policy has no box bound and is searched on a grid of its knobs (its module's ``candidates``)."""
    return hasattr(policy_module(policy), "candidates")


GRID_POINTS = 9
"""Values per knob of the grid a policy without a box bound is searched on under the paper's bound."""


def _best_gridded(prob: Problem, policies: list[Policy], opts: SearchOptions, profile, incumbent: Plan | None,
                  error: ExeGPTError | None) -> tuple[Plan | None, dict, ExeGPTError | None, int]:
    """The policies without a box bound under the paper's bound: every schedule of their knob grid
    (``simulated_candidates``) estimated, the best whose estimate meets the bound (with the margin) if it beats
    ``incumbent``; with ``verify_requests``, only one whose simulated requests meet it too (at most
    ``VERIFY_ATTEMPTS`` replays). Returns the pick, the best estimate of each policy (0: none met the bound),
    the error to raise if nothing was picked and the schedules estimated."""
    bound_s = prob.bound.bound_s * (1 - opts.latency_margin)
    n = prob.cluster.count
    counts = opts.device_counts if opts.device_counts is not None else \
        sorted({c for c in range(1, n + 1) if n <= 8 or c & (c - 1) == 0} | {n})
    cands = simulated_candidates(prob, policies, opts.tp_degrees, opts.space, counts, GRID_POINTS)
    reached = {p.value: 0.0 for p in policies}
    plans, fastest = [], math.inf
    for _, policy, make in cands:
        plan = make(SearchStats("grid", 0, 0.0))
        fastest = min(fastest, plan.estimate.latency_s)
        if plan.estimate.latency_s <= bound_s:
            plans.append(plan)
            reached[policy] = max(reached[policy], plan.estimate.throughput_seq_s)
    floor = incumbent.estimate.throughput_seq_s if incumbent is not None else 0.0
    plans = sorted((p for p in plans if p.estimate.throughput_seq_s > floor),
                   key=lambda p: -p.estimate.throughput_seq_s)
    if plans and not opts.verify_requests:
        return plans[0], reached, None, len(cands)
    for plan in plans[:VERIFY_ATTEMPTS] if opts.verify_requests else ():
        worst = _replayed_latency(plan, profile, opts.verify_requests)
        if not worst > bound_s:
            return dataclasses.replace(plan, search=dataclasses.replace(
                plan.search, replay_requests=opts.verify_requests, replay_latency_s=worst)), reached, None, \
                len(cands)
    if incumbent is None:  # the error names the lower of the box policies' smallest bound and the grid's
        box_smallest = error.smallest_feasible_s if isinstance(error, InfeasibleBoundError) else math.inf
        if error is None or (math.isfinite(fastest) and fastest / (1 - opts.latency_margin) < box_smallest):
            error = _infeasible(prob, fastest, opts.latency_margin)
    return incumbent, reached, error, len(cands)


def _solve_boxed(prob: Problem, policies: list[Policy], opts: SearchOptions, profile, t0: float,
                 each: bool) -> tuple[Plan, dict]:
    """The branch and bound over the box policies (exact), with ``verify_requests`` its replays; ``each``: also
    the best throughput of each policy alone (one more branch and bound per policy)."""
    method, latency_margin, verify_requests = opts.method, opts.latency_margin, opts.verify_requests
    layouts = all_spaces(prob, policies, opts.tp_degrees, opts.space, opts.device_counts)
    spaces = [sp for _, _, sp in layouts]
    # Plan against a tighter bound when the caller keeps a margin for the simulator's error.
    bound_s = prob.bound.bound_s * (1 - latency_margin)
    search_bound_s, evaluated, pruned = bound_s, 0, 0
    reached: dict = {}

    def stats(extra: int = 0) -> SearchStats:
        return SearchStats(method, evaluated + extra, time.perf_counter() - t0, sum(sp.size for sp in spaces),
                           pruned)

    for _ in range(VERIFY_ATTEMPTS):
        if method == "exhaustive":
            res: SearchResult = exhaustive(spaces, search_bound_s)
        elif each:  # one branch and bound per policy, the best of them: the pick and what each policy reached
            res = _each_policy(layouts, policies, search_bound_s, opts, reached)
            each = False
        else:
            res = branch_and_bound(spaces, search_bound_s, opts.eps_throughput, opts.eps_latency)
        evaluated, pruned = evaluated + res.candidates_evaluated, pruned + res.boxes_pruned
        if res.space is None:
            break
        plan = _plan_at(layouts, res, stats())
        if not verify_requests:
            return plan, reached
        worst = _replayed_latency(plan, profile, verify_requests)
        if not worst > bound_s:  # NaN: no sampled request reached the bound length, nothing to hold
            return _verified(plan, verify_requests, worst, t0), reached
        # The pick's worst bound-length request missed: search again below the estimate it had, by the ratio.
        search_bound_s = min(search_bound_s, plan.estimate.latency_s) * bound_s / worst
    # The lowest-latency schedule by estimate: what the infeasibility error names and, with verification, the last
    # resort, replayed once for both. The search that found nothing under the bound went on for it; else one more.
    fastest = res.fastest if res.space is None and res.fastest is not None else \
        branch_and_bound(spaces, math.inf, minimize_latency=True)
    replayed_s = math.nan
    if verify_requests and fastest.space is not None:
        plan = _plan_at(layouts, fastest, stats(fastest.candidates_evaluated))
        replayed_s = _replayed_latency(plan, profile, verify_requests)
        if fastest.latency <= bound_s and not replayed_s > bound_s:
            return _verified(plan, verify_requests, replayed_s, t0), reached
    latency, how = (fastest.latency if fastest.space is not None else math.inf), ""
    # find_schedule(verify_requests=...) falls back to the lowest-latency schedule under a bound that both its
    # estimate and its worst replayed request keep.
    if replayed_s > latency:
        latency, how = replayed_s, f" (the worst of {verify_requests} replayed requests of the lowest-latency " \
                                   f"schedule)"
    raise _infeasible(prob, latency, latency_margin, how)


def _each_policy(layouts, policies: list[Policy], bound_s: float, opts: SearchOptions, reached: dict
                 ) -> SearchResult:
    """A branch and bound over each policy's spaces alone; records each one's best throughput in ``reached`` (0:
    none meets the bound) and returns the best of them, its space indexed among all of ``layouts`` (where none
    meets the bound, with the lowest-latency point of them all as ``fastest``)."""
    best, fastest, evaluated, bounds, pruned, wall = None, None, 0, 0, 0, 0.0
    for p in policies:
        idx = [i for i, (_, lay, _) in enumerate(layouts) if lay.policy is p]
        r = branch_and_bound([layouts[i][2] for i in idx], bound_s, opts.eps_throughput, opts.eps_latency)
        evaluated, bounds = evaluated + r.points_evaluated, bounds + r.bounds_evaluated
        pruned, wall = pruned + r.boxes_pruned, wall + r.wall_s
        reached[p.value] = r.throughput if r.space is not None else 0.0
        if r.space is not None and (best is None or r.throughput > best.throughput):
            best = dataclasses.replace(r, space=idx[r.space], fastest=None)
        f = r.fastest
        if f is not None and f.space is not None and (fastest is None or f.latency < fastest.latency):
            fastest = dataclasses.replace(f, space=idx[f.space])
    if best is None:
        return SearchResult(None, None, 0.0, math.inf, evaluated, bounds, pruned, wall,
                            fastest or SearchResult(None, None, 0.0, math.inf, 0, 0, 0, 0.0))
    return dataclasses.replace(best, points_evaluated=evaluated, bounds_evaluated=bounds, boxes_pruned=pruned,
                               wall_s=wall)


def _plan_at(layouts, res: SearchResult, stats: SearchStats) -> Plan:
    sub, lay, _ = layouts[res.space]
    return _plan(sub, lay, _schedule(lay, res.point, sub.cluster.count), stats)


def _verified(plan: Plan, requests: int, worst_s: float, t0: float) -> Plan:
    return dataclasses.replace(plan, search=dataclasses.replace(
        plan.search, wall_s=time.perf_counter() - t0, replay_requests=requests, replay_latency_s=worst_s))


def _replayed_latency(plan: Plan, profile: Profile | None, requests: int) -> float:
    """The worst bound-length latency of ``plan`` run on the simulated engine on ``requests`` requests of its
    workload (seed 0)."""
    from ..sim import run_simulated

    return run_simulated(plan, profile, num_requests=requests, seed=0).latency_s


def find_schedule(dist: Workload, slo, *, model=None, devices=None, profile: Profile | None = None,
                  policies=None, tp_degrees=None, eps_throughput: float = 0.0, eps_latency: float = 0.0,
                  space: SearchSpace = SearchSpace(), memory_fraction: float = MEMORY_FRACTION,
                  latency_margin: float = 0.0, device_counts=None, verify_requests: int = 0,
                  simulated: SimulatedSearch = SimulatedSearch(), per_policy: bool = False) -> Plan:
    """The highest-throughput schedule whose bound-length output meets ``slo`` seconds.

    ``dist``: a Workload. ``slo``: seconds (or a LatencyBound with another length quantile), the paper's form;
    or an ``exegpt.slo.CompletionSLO`` (a share of requests finish within a bound: the highest simulated
    throughput that keeps it) or ``RequestSLO`` (TTFT / TPOT percentiles: the highest goodput), both searched on
    the simulated engine as ``simulated`` says (``exegpt.goodput``); the plan's ``slo_check`` records the form,
    and whether and by what margin it holds.
    ``model``/``devices``: names such as "opt-13b" and "4xA40" (defaults: the paper's OPT-13B on 4xA40).
    ``profile``: a Profile (default: the built-in GPU profile of model on the device type).
    ``policies``: names of ``exegpt.policies`` (default ``ALL_POLICIES``). ``per_policy``: also
    search each policy for its own best (``plan.search.per_policy``; slower: one branch and bound per policy with a
    box bound instead of one over them all, pruned by each other's incumbent; simulated SLO forms report it always).
    ``tp_degrees``: TP degrees to try (default: all the profile supports). ``eps_*``: the paper's search
    tolerances (0 = the exact optimum).
    ``latency_margin``: plan against ``slo * (1 - margin)``, keeping room for the simulator's error when the
    plan is run (benchmarks/fidelity.py measures that error); the plan still records ``slo``.
    ``device_counts``: how many of the devices a schedule may use (default None: any count from 1 to all; the
    plan's ``devices`` and ``schedule.num_gpus`` say how many it uses; under a latency bound, the policies without
    a box bound try every count up to 8 devices, above that powers of two and all of them); ``(n,)`` uses
    exactly n.
    ``verify_requests``: also simulate the pick on that many requests of ``dist`` (``exegpt.sim``, seed 0; the
    requests ``runner.run_plan(plan, num_requests=n)`` runs) and keep it only if the worst of its bound-length
    requests meets the bound (with the margin), not just their expected latency; else search again below the
    pick's latency (at most ``VERIFY_ATTEMPTS`` searches, then the lowest-latency schedule). The plan's
    ``search.replay_latency_s`` is that worst latency. 0 (default): the paper's search alone.
    Raises InfeasibleBoundError naming the smallest feasible bound when nothing meets ``slo`` (with
    ``verify_requests``, one that the lowest-latency schedule's replay keeps too).
    """
    if isinstance(slo, (CompletionSLO, RequestSLO)):
        given = [k for k, v in (("eps_throughput", eps_throughput), ("eps_latency", eps_latency),
                                ("latency_margin", latency_margin), ("verify_requests", verify_requests)) if v]
        if given:
            raise ExeGPTError(f"{', '.join(given)} apply to a latency bound; a {type(slo).__name__} is searched on "
                              f"the simulated engine (options: simulated=SimulatedSearch(...))")
        t0 = time.perf_counter()
        prob = problem(dist, math.inf, model=model, devices=devices, profile=profile, memory_fraction=memory_fraction)
        cands = simulated_candidates(prob, ALL_POLICIES if policies is None else policies, tp_degrees, space,
                                     device_counts, simulated.grid_points)
        return search_simulated(cands, slo, profile, simulated, t0)
    policies = ALL_POLICIES if policies is None else policies
    return _solve(dist, slo, dict(model=model, devices=devices, profile=profile),
                  SearchOptions("branch_and_bound", policies, tp_degrees, eps_throughput, eps_latency, space,
                                memory_fraction, latency_margin, device_counts, verify_requests, per_policy))


def exhaustive_schedule(dist: Workload, slo, *, model=None, devices=None, profile: Profile | None = None,
                        policies=ALL_POLICIES, tp_degrees=None, space: SearchSpace = SearchSpace(),
                        memory_fraction: float = MEMORY_FRACTION, device_counts=None) -> Plan:
    """The true optimum of the same space as ``find_schedule``, by evaluating every point."""
    return _solve(dist, slo, dict(model=model, devices=devices, profile=profile),
                  SearchOptions("exhaustive", policies, tp_degrees, space=space, memory_fraction=memory_fraction,
                                device_counts=device_counts))


def static_schedule(dist: Workload, slo, *, model=None, devices=None, profile: Profile | None = None,
                    max_batch: int = 256, memory_fraction: float = MEMORY_FRACTION) -> Plan:
    """The FasterTransformer-style baseline: the best static batch with TP inside a node and pipeline
    stages across nodes; its bound applies to the longest output (paper §7.1)."""
    t0 = time.perf_counter()
    prob = problem(dist, slo, model=model, devices=devices, profile=profile, memory_fraction=memory_fraction)
    lay = baseline_layout(prob)
    n = prob.cluster.count
    batches = np.arange(1, max_batch + 1)
    thr, lat, ok = points(prob, lay, batches)
    feasible = ok & (lat <= prob.bound.bound_s)
    if not feasible.any():
        fits = ok.any()
        smallest = float(lat[ok].min()) if fits else math.inf
        raise InfeasibleBoundError(
            f"static batching cannot meet {prob.bound.bound_s:g} s for the longest output "
            f"({prob.workload.output_len.max} tokens); the smallest feasible bound is {smallest:.4g} s", smallest)
    i = int(np.argmax(np.where(feasible, thr, -np.inf)))
    s = StaticSchedule(int(batches[i]), lay.tp, n)
    return _plan(prob, lay, s, SearchStats("exhaustive", len(batches), time.perf_counter() - t0, len(batches)))


def evaluate_schedule(schedule: Schedule, dist: Workload, slo=math.inf, *, model=None, devices=None,
                      profile: Profile | None = None, memory_fraction: float = MEMORY_FRACTION) -> Plan:
    """A Plan for a schedule you choose (its estimate and layer placement)."""
    t0 = time.perf_counter()
    prob = problem(dist, slo, model=model, devices=devices, profile=profile, memory_fraction=memory_fraction)
    lay = layout_for(prob, schedule)
    return _plan(prob, lay, schedule, SearchStats("given", 1, time.perf_counter() - t0, 1))


def frontier(dist: Workload, bounds_s, **kw) -> list[Plan | None]:
    """The best plan at each bound (None where the bound is infeasible): the throughput-latency frontier."""
    out = []
    for b in bounds_s:
        try:
            out.append(find_schedule(dist, b, **kw))
        except InfeasibleBoundError:
            out.append(None)
    return out


def smallest_feasible_bound(dist: Workload, *, model=None, devices=None, profile: Profile | None = None,
                            policies=BOX_POLICIES, tp_degrees=None, space: SearchSpace = SearchSpace(),
                            memory_fraction: float = MEMORY_FRACTION, device_counts=None) -> float:
    """The lowest latency any schedule of the space (as ``find_schedule`` searches it) achieves for the
    bound-length output."""
    prob = problem(dist, math.inf, model=model, devices=devices, profile=profile, memory_fraction=memory_fraction)
    spaces = [sp for _, _, sp in all_spaces(prob, policies, tp_degrees, space, device_counts)]
    res = branch_and_bound(spaces, math.inf, minimize_latency=True)
    return res.latency
