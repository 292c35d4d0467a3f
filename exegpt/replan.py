"""Re-planning a running plan when its workload drifts, in two steps.

1. The cheap move: the best schedule the running engine can switch to between phases without moving weights or
   cache, on the plan's own layout (the policy module's ``retune_space``: RRA's B_E and N_D within the cache rows
   it holds, WAA's B_m), for the workload fitted to what the monitor saw, under the plan's bound (or, where no
   point keeps it, the lowest latency the layout reaches). A branch and bound over one small space: milliseconds.
2. The full re-plan: ``find_schedule`` over every policy and layout for the same workload, reported beside the
   cheap move with its estimated gain, so that a user can decide whether a redeploy is worth it.

``DriftControl`` is what a policy's driver consults between phases (``exegpt.policies.driver_groups(plan,
control)``): it feeds the requests that finished to the monitor (``exegpt.drift``), starts the re-plan at an alarm
and hands the driver the plan in force. Both engines run it: the simulated engine (``exegpt.sim``) re-plans at the
phase boundary where the drift is detected (no simulated time passes: runs stay deterministic); the runner
(``runner.engine``) finds the cheap move on a thread while its driver runs on, and the move applies at the first
phase boundary after it is ready. Both run the full re-plans once the driver has finished (``finish``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .distribution import Distribution
from .drift import MARGINALS, Alarm, DriftEvent, DriftMonitor, MonitorOptions
from .errors import ExeGPTError, InfeasibleBoundError
from .plan import Plan, SearchStats, SLOCheck
from .policies import describe, policy_module
from .profile import Profile
from .search.bnb import branch_and_bound
from .search.optimize import find_schedule
from .sim import plan_problem
from .simulate import estimate
from .workload import Workload


@dataclass(frozen=True)
class DriftOptions:
    """Whether and how a run watches its workload and re-plans (``run_simulated(drift=...)``,
    ``runner.run_plan(drift=...)``)."""

    monitor: MonitorOptions = MonitorOptions()
    profile: Profile | None = None
    """The profile to re-plan with: the one the plan was made with (default: the built-in profile of its model and
    devices)."""
    replan: bool = True
    """Apply the cheap move; False: detect and report only (a baseline)."""
    full_replan: bool = True
    """Also run the full re-plan and report its gain."""
    latency_margin: float = 0.0
    """Re-plan against ``bound * (1 - margin)``, room for the estimate's error, as ``find_schedule``'s."""
    min_gain: float = 0.05
    """Move only when the plan in force breaks the bound (with the margin) on the fitted workload, or when the move
    adds at least this share of throughput."""

    def __post_init__(self):
        if not isinstance(self.monitor, MonitorOptions):
            raise ExeGPTError(f"drift monitor options must be a MonitorOptions, got {type(self.monitor).__name__}")
        if isinstance(self.latency_margin, bool) or not isinstance(self.latency_margin, (int, float)) or \
                not 0 <= self.latency_margin < 1:
            raise ExeGPTError(f"drift latency_margin={self.latency_margin!r} must be in [0, 1)")
        if isinstance(self.min_gain, bool) or not isinstance(self.min_gain, (int, float)) or not self.min_gain >= 0:
            raise ExeGPTError(f"drift min_gain={self.min_gain!r} must be a number >= 0")

    def control(self, plan: Plan, order, background: bool = False) -> DriftControl:
        """The monitor and re-planner of one driver under these options (``DriftControl``). The simulated engine
        builds its control through this method, so that it needs no import of this module, which plans with the
        search that runs that engine."""
        return DriftControl(plan, self, order, background)

    def __reduce__(self):
        # The profile travels as its JSON fields: a Profile holds interpolating functions that do not pickle, and the
        # runner sends these options to its ranks.
        return _options, (self.monitor, None if self.profile is None else self.profile.to_dict(), self.replan,
                          self.full_replan, self.latency_margin, self.min_gain)


def _options(monitor: MonitorOptions, profile: dict | None, *rest) -> DriftOptions:
    return DriftOptions(monitor, None if profile is None else Profile.from_dict(profile), *rest)


def rescaled(dist: Distribution, factor: float, max_len: int) -> Distribution:
    """``dist`` with every length times ``factor``, each mass split between the two whole lengths around its new
    length (the mean scales exactly, no length is left without mass), at most ``max_len``."""
    x = dist.lengths_array * factor
    lo = np.floor(x)
    w = x - lo
    lengths = np.clip(np.concatenate([lo, lo + 1]), 1, max_len).astype(np.int64)
    probs = np.concatenate([dist.probs_array * (1 - w), dist.probs_array * w])
    values, inv = np.unique(lengths, return_inverse=True)
    mass = np.zeros(len(values))
    np.add.at(mass, inv, probs)
    return Distribution.from_pmf(values, mass / mass.sum())


def fitted_workload(current: Workload, base: Workload, alarm: Alarm) -> Workload:
    """``current`` with the alarmed marginal replaced by ``base``'s (the plan's own) rescaled to the mean the monitor
    saw, within ``base``'s longest lengths (the plan's KV-cache budget per sequence)."""
    i = MARGINALS.index(alarm.marginal)
    dists = [current.input_len, current.output_len]
    src = (base.input_len, base.output_len)[i]
    dists[i] = rescaled(src, (alarm.input_mean, alarm.output_mean)[i] / src.mean(), src.max)
    return Workload(*dists, name=f"{base.name} (drifted)")


def _retune(plan: Plan, workload: Workload, profile: Profile | None):
    """The policy module of ``plan``, its problem and layout for ``workload``, and its cheap-move space there."""
    module = policy_module(plan.schedule.policy)
    if not hasattr(module, "retune_space"):
        raise ExeGPTError(f"policy {plan.schedule.policy.value} has no cheap move; drift re-planning runs RRA and "
                          f"WAA plans")
    prob, lay = plan_problem(dataclasses.replace(plan, workload=workload), profile)
    return module, prob, lay, module.retune_space(prob, lay, plan)


def in_force(plan: Plan, workload: Workload, profile: Profile | None = None) -> tuple[float, float]:
    """(throughput seq/s, bound-length latency s) estimated for ``plan``'s schedule serving ``workload`` on its
    layout. A knob past its space's limit acts as the limit (an N_D beyond the longest output's decode
    iterations runs as many)."""
    module, _, _, space = _retune(plan, workload, profile)
    p = np.clip(np.asarray(module.retune_point(plan.schedule)), space.lo, space.hi)[None, :]
    thr, lat, _ = space.fn(p, p)
    return float(np.ravel(thr)[0]), float(np.ravel(lat)[0])


def cheap_move(plan: Plan, workload: Workload, profile: Profile | None = None, latency_margin: float = 0.0) -> Plan:
    """The best plan for ``workload`` that keeps ``plan``'s layout, weights and cache (module docstring, step 1),
    searched under ``bound * (1 - latency_margin)``; its ``slo_check`` says whether it keeps the bound.

    Raises:
        ExeGPTError: the policy has no cheap move, or no point of its space fits.
    """
    t0 = time.perf_counter()
    module, prob, lay, space = _retune(plan, workload, profile)
    res = branch_and_bound([space], prob.bound.bound_s * (1 - latency_margin))
    if res.point is None:  # no point keeps the bound on this layout: the lowest latency it reaches
        res = branch_and_bound([space], math.inf, minimize_latency=True)
    if res.point is None:
        raise ExeGPTError(f"no {describe(plan.schedule)} variant fits its layout for workload {workload.name!r}")
    s = module.retuned(plan.schedule, res.point)
    est = estimate(prob, lay, s)
    check = SLOCheck.of_bound(prob.bound, est)
    stats = SearchStats("cheap_move", res.candidates_evaluated, time.perf_counter() - t0, space.size)
    return dataclasses.replace(plan, schedule=s, estimate=est, workload=workload, search=stats, slo_check=check)


def full_replan(plan: Plan, workload: Workload, profile: Profile | None = None, latency_margin: float = 0.0
                ) -> Plan | None:
    """The best plan of any policy and layout for ``workload`` under ``plan``'s bound (with the margin), model and
    devices (None: no schedule keeps it)."""
    try:
        return find_schedule(workload, plan.bound, model=plan.model, devices=plan.devices, profile=profile,
                             latency_margin=latency_margin)
    except InfeasibleBoundError:
        return None


def _done(value) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f


class DriftControl:
    """The monitor and the re-planner of one driver (module docstring)."""

    def __init__(self, plan: Plan, options: DriftOptions, order, background: bool = False):
        """``order``: the ids of the requests the driver serves, in admission order. ``background``: re-plan on a
        thread (the runner) instead of at the phase boundary of the alarm (the simulated engine)."""
        self.plan, self.options = plan, options
        self.base = plan.workload  # what the run was planned for
        self.monitor = DriftMonitor(plan.workload, options.monitor)
        self.position = {int(r): i for i, r in enumerate(order)}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="replan") if background else None
        self._events: list[DriftEvent] = []
        self._move: Future | None = None  # the cheap move being found: (plan, event, fitted workload)
        # NOTE: the full re-plan is advice for a redeploy; it runs once the driver has finished. Run beside the
        # driver it took the cores for its whole search (0.2-2 s): on a thread (the interpreter lock) and in a
        # process of its own at the lowest priority alike, on two shared cores the tiny model's driver, whose steps
        # take a millisecond, then served the requests in flight 5-14x slower than their bound.
        self._full: list[tuple[int, Workload]] = []  # (event index, fitted workload) of the full re-plans due

    def between_phases(self, view, rids) -> Plan:
        """Reads which of ``rids`` have finished (each once: the driver frees their rows next), starts a re-plan
        on an alarm, and returns the plan in force (a finished re-plan's cheap move from now on)."""
        now = float(view.now())
        for r in rids:
            if view.done(r):
                alarm = self.monitor.observe(self.position[r], view.input_len(r), view.generated(r))
                if alarm is not None:
                    self._apply(now)
                    self._alarm(alarm, now)
        self._apply(now)
        return self.plan

    def _apply(self, now: float) -> None:
        """Takes the cheap move when it is ready."""
        if self._move is None or not self._move.done():
            return
        plan, event, fitted = self._move.result()
        self._move = None
        if plan is not None:
            self.plan = plan
            event = dataclasses.replace(event, applied_s=now)
        self._events.append(event)
        if self.options.full_replan:
            self._full.append((len(self._events) - 1, fitted))

    def _alarm(self, alarm: Alarm, now: float) -> None:
        fitted = fitted_workload(self.monitor.workload, self.base, alarm)
        self.monitor.reset(fitted, alarm)  # from here the monitor tests against what the re-plan plans for
        if not self.options.replan or self._move is not None:  # a move still being found: this one is reported
            self._events.append(self._event(alarm, now, fitted, move=False)[1])
            return
        self._move = self._submit(self._event, alarm, now, fitted)

    def _submit(self, fn, *args) -> Future:
        return self._pool.submit(fn, *args) if self._pool is not None else _done(fn(*args))

    def _event(self, alarm: Alarm, now: float, fitted: Workload, move: bool = True
               ) -> tuple[Plan | None, DriftEvent, Workload]:
        """The event of an alarm, the cheap move (None: not asked for, or none fits the layout) and the fitted
        workload."""
        prof = self.options.profile
        t0 = time.perf_counter()
        thr, lat = in_force(self.plan, fitted, prof)
        event = DriftEvent(alarm.kind, now, alarm.observed, alarm.change_at, alarm.marginal, alarm.p_value,
                           fitted.input_len.mean() / self.base.input_len.mean(),
                           fitted.output_len.mean() / self.base.output_len.mean(),
                           describe(self.plan.schedule), "", self.plan.bound.bound_s, lat, thr)
        if not move:
            return None, event, fitted
        o = self.options
        try:
            moved = cheap_move(self.plan, fitted, prof, o.latency_margin)
        except ExeGPTError:  # nothing on this layout fits the fitted workload: the plan stays, the full re-plan says
            return None, dataclasses.replace(event, move_s=time.perf_counter() - t0), fitted
        event = dataclasses.replace(event, new_latency_s=moved.estimate.latency_s,
                                    new_throughput_seq_s=moved.estimate.throughput_seq_s,
                                    move_s=time.perf_counter() - t0)
        if lat <= self.plan.bound.bound_s * (1 - o.latency_margin) and \
                moved.estimate.throughput_seq_s < (1 + o.min_gain) * thr:
            return None, event, fitted  # the plan keeps the bound and the move adds too little to be worth a change
        return moved, dataclasses.replace(event, after=describe(moved.schedule)), fitted

    def finish(self) -> tuple[DriftEvent, ...]:
        """The run's drift events, with their full re-plans (run here) and every move started (one found after the
        driver's last phase is reported, never applied)."""
        if self._move is not None:
            self._events.append(self._move.result()[1])
            self._move = None
        for index, fitted in self._full:
            t0 = time.perf_counter()
            plan = full_replan(self.plan, fitted, self.options.profile, self.options.latency_margin)
            wall = time.perf_counter() - t0
            if plan is not None:
                self._events[index] = dataclasses.replace(
                    self._events[index], full=describe(plan.schedule),
                    full_throughput_seq_s=plan.estimate.throughput_seq_s, full_s=wall)
        self._full = []
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        return tuple(self._events)
