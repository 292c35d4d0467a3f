"""The simulated engine: a policy's drivers run on a deterministic discrete-event loop, every action priced by the
profile's cost model, no torch.

The same driver generators the runner executes (``exegpt.policies``) run here, one per group of stages, each on
a clock of its own; the loop always advances the driver with the earliest clock (the encode group first on a tie),
and a driver blocked on the other group (a merge, a credit) waits until that group has produced it. Requests
arrive by the run's ``Arrivals``; a driver sees only what has arrived by its own clock.

How actions are priced (the same stage costs as the estimate: profile lookups, TP all-reduces, hops, the
executor's own work, the rank slowdown):
  * ``main`` prefill of P-stage micro-batches: a flow shop (a micro-batch enters stage s once it left stage s - 1
    and stage s finished the one before), each micro-batch at its own prompts' lengths; the driver computes the
    first stage as it submits, so micro-batch j starts when stage 0 has finished micro-batch j - 1; first tokens
    come back (``token_return``) after the last one;
  * a decode iteration of micro-batches over the group's stages: the longer of the busiest stage (its
    micro-batches summed) and the slowest micro-batch's round trip (its stages and the token hop back); every row
    gets its token at the iteration's end;
  * WAA: the encode group's batches flow through its stages; each batch's KV hand-off (``kv_handoff``) is on the
    decode driver's compute where ``Profile.handoff_on_compute``. As in the estimate (``concurrent_times``), a
    one-rank group computes ``Profile.concurrency`` times slower while the other computes too, and every computed
    term carries the profile's lockstep factor (``waa_period_factor``).
The machine's own variance is not in it.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .arrivals import Arrivals, request_stream
from .checks import instance
from .errors import ExeGPTError
from .ledger import Ledger
from .plan import Plan
from .models import get_model
from .policies import driver_groups, policy_module, prefix_cache
from .policies.base import DECODE, ENCODE, MAIN, AwaitCredit, Chunk, Compact, Decode, DriverStats, EndHandOffs, Evict, \
    Merge, Peek, Prefill, WaitArrival, decision
from .profile import Profile
from .report import RunReport, build_report
from .problem import Problem, problem
from .replicas import merge_stats, replicas_of, route
from .sim_prices import SimPrices
from .stages import Layout, spans_ranks

DEFAULT_REQUESTS = 600
"""Requests a simulated run serves by default: as many as the closed loop's runs (``profiler.loop``)."""


def run_simulated(plan: Plan, profile: Profile | None = None, num_requests: int = DEFAULT_REQUESTS, seed: int = 0,
                  lengths=None, arrivals: Arrivals | None = None, arrival_s=None, horizon_s: float = math.inf,
                  log_decisions: bool = False, drift=None, latency_lens=None, prompts=None) -> RunReport:
    """Runs ``plan`` on the simulated engine, costed with ``profile`` (the profile its estimate came from; by
    default the built-in profile of its model and devices, as ``find_schedule``'s default).

    The requests: ``num_requests`` drawn from ``plan.workload`` with ``seed``, arriving by ``arrivals`` (default
    all at once): the requests ``runner.run_plan(plan, num_requests=..., seed=..., arrivals=...)`` runs. Or
    ``lengths``, (input, output) tokens per request in order, with ``arrival_s`` (default all at zero).
    Requests longer than the plan's KV-cache budget per sequence (its workload's longest prompt plus longest
    output) fail on admission, as in the runner. ``horizon_s``: stop there (a driver starts no action past it);
    the requests not finished by then fail, those never started as still queued. ``log_decisions``: keep every
    driver action in ``RunReport.decisions``. ``drift``: an ``exegpt.replan.DriftOptions``: watch the lengths served
    and re-plan when they drift (``RunReport.drift``; one replica). ``latency_lens``: per request, the output length
    whose token time its record keeps (``latency_len_token_s``; default: the plan's bound length), e.g. the bound
    length of the distribution each request came from in a drift study. ``prompts``: each request's prompt token
    ids (with ``lengths``), which a policy with a prefix cache matches (default: distinct prompts, nothing shared).
    """
    instance(plan, Plan, "plan", "a Plan (find_schedule's result, or Plan.load(path))")
    if not horizon_s > 0:
        raise ExeGPTError(f"horizon_s={horizon_s!r} must be > 0 seconds (inf: run every request)")
    if lengths is None:
        stream = request_stream(plan.workload, num_requests, seed, arrivals)
        lengths, arrival_s = stream.lengths, stream.arrival_s
        if prompts is None and hasattr(policy_module(plan.schedule.policy), "prefix_cache_tokens"):
            vocab = get_model(plan.model).vocab_size  # the prompt ids runner.requests.make_requests draws
            prompts = [tuple(int(t) for t in stream.rng.integers(0, vocab, size=int(i))) for i, _ in lengths]
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.ndim != 2 or lengths.shape[1] != 2 or not len(lengths) or (lengths < 1).any():
        raise ExeGPTError(f"lengths must be (input, output) pairs of at least 1 token each, got shape "
                          f"{lengths.shape} with least value {lengths.min() if lengths.size else None}")
    arrival_s = np.zeros(len(lengths)) if arrival_s is None else np.asarray(arrival_s, dtype=float)
    if prompts is not None and [len(q) for q in prompts] != lengths[:, 0].tolist():
        raise ExeGPTError(f"prompts must be one per request ({len(lengths)}) with the lengths' input tokens")
    prob, lay = plan_problem(plan, profile)
    ledger = Ledger(lengths, arrival_s, plan.estimate.latency_len if latency_lens is None else latency_lens,
                    cache_len=plan.workload.max_total_len)
    if not ledger.runnable:
        raise ExeGPTError(f"every one of the {len(lengths)} requests exceeds the plan's KV-cache budget of "
                          f"{plan.workload.max_total_len} tokens per sequence (its workload's longest prompt plus "
                          f"longest output); the shortest has {lengths.sum(axis=1).min()}")
    replicas = replicas_of(plan)
    if replicas > 1 and not spans_ranks(lay.stages):  # one-rank replicas computing back to back, side by side
        prob = dataclasses.replace(prob, cost=dataclasses.replace(prob.cost, slowdown=prob.concurrency))
    if drift is not None and not callable(getattr(drift, "control", None)):
        raise ExeGPTError(f"drift must be an exegpt.replan.DriftOptions, got {type(drift).__name__}")
    if drift is not None and replicas > 1:
        raise ExeGPTError(f"drift re-planning runs one replica; the plan has {replicas}")
    stats, log, events, cached = [], [], (), 0
    for serves in route(ledger.runnable, replicas):
        control = None
        if drift is not None:
            control = drift.control(plan, serves)
        engine = SimEngine(prob, lay, plan, ledger, horizon_s, [] if log_decisions else None, serves, control,
                           prompts)
        stats.append(engine.run())
        cached += engine.prefix.hit_tokens if engine.prefix is not None else 0
        log += engine.log or []
        events = control.finish() if control is not None else events
    stats = merge_stats(stats)
    return build_report(plan.schedule.policy.value, ledger.records(), plan.estimate.latency_len,
                        list(stats.encode_s), list(stats.decode), plan.schedule.num_gpus, plan.estimate,
                        stats.steady, engine="simulated", decisions=tuple(log), drift=events, cached_tokens=cached)


def plan_problem(plan: Plan, profile: Profile | None) -> tuple[Problem, Layout]:
    """The problem and layout a plan's estimate was made on."""
    prob = problem(plan.workload, plan.bound, model=plan.model, devices=plan.devices, profile=profile)
    if plan.schedule.num_gpus != prob.cluster.count:
        prob = prob.with_devices(plan.schedule.num_gpus)
    s = plan.schedule
    lay = Layout(s.policy, s.tp, getattr(s, "tp_gpus", 0), getattr(s, "encode_gpus", 0), getattr(s, "decode_gpus", 0),
                 plan.stages)
    return prob, lay


class _Driver:
    """One driver's generator, clock and what it waits for."""

    def __init__(self, group: str, gen, order: int):
        self.group, self.gen, self.order = group, gen, order
        self.t = 0.0
        self.result = None
        self.blocked: object | None = None  # the action it waits on (Merge, AwaitCredit)
        self.stats: DriverStats | None = None
        self.finished = False
        self.pending = None  # the action it yielded last, whose result it gets next
        self.credits = 0  # credits taken (the encode driver of WAA)
        self.last, self.last_s = None, None  # the action before and its seconds (``Chunk.overlap``)


class _View:
    """A driver's view (``policies.base.View``) on the simulated engine."""

    def __init__(self, engine: SimEngine, driver: _Driver, num_stages: int):
        self.e, self.d, self.num_stages = engine, driver, num_stages
        self.max_len = engine.plan.workload.max_total_len

    def now(self) -> float:
        return self.d.t

    def waiting(self) -> list[int]:
        e = self.e
        end = e.arrived_by(self.d.t)
        return [r for r in e.runnable[e.taken:end].tolist() if r not in e.took]

    def arrived(self) -> int:
        return self.e.arrived_by(self.d.t)

    def num_runnable(self) -> int:
        return len(self.e.runnable)

    def more_to_come(self) -> bool:
        return self.e.arrived_by(self.d.t) < len(self.e.runnable)

    def done(self, rid: int) -> bool:
        return bool(self.e.ledger.finished[rid])

    def input_len(self, rid: int) -> int:
        return int(self.e.ledger.inp[rid])

    def generated(self, rid: int) -> int:
        return int(self.e.ledger.gen[rid])

    def prompt(self, rid: int) -> tuple[int, ...]:
        return self.e.prompt(rid)

    def cached_prefix(self, rid: int) -> int:
        return 0 if self.e.prefix is None else self.e.prefix.cached(rid)


class SimEngine(SimPrices):
    """Runs a plan's drivers (``exegpt.policies``) on simulated time."""

    def __init__(self, prob: Problem, lay: Layout, plan: Plan, ledger: Ledger, horizon_s: float = math.inf,
                 log: list | None = None, serves: list[int] | None = None, control=None, prompts=None):
        """``serves``: the runnable requests this engine's drivers serve (one replica's, ``exegpt.replicas``;
        None: all). ``control``: the drift re-planner the drivers consult (``exegpt.replan.DriftControl``).
        ``prompts``: the requests' prompt token ids (None: distinct made-up ones)."""
        self.prob, self.lay, self.plan, self.ledger = prob, lay, plan, ledger
        self.control = control
        self.horizon_s, self.log = horizon_s, log
        self.runnable = np.asarray(ledger.runnable if serves is None else serves, dtype=np.int64)
        self.arrive = ledger.arrival[self.runnable]
        self.taken = 0  # the first runnable request (in arrival order) no prefill took
        self.took: set[int] = set()  # requests taken out of arrival order, beyond ``taken``
        self.done_ids: set[int] = set()  # the requests before ``taken``
        self.serving = set(self.runnable.tolist())
        self.prompts = prompts
        self.prefix = prefix_cache(plan, self.prompt)
        self.padded = prob.cost.padded
        self.padded_decode = prob.cost.padded_decode
        self.stages = {MAIN: lay.stages, ENCODE: lay.group("encode"), DECODE: lay.group("decode")}
        self.split = any(s.role != "both" for s in lay.stages)  # two groups computing at once (WAA)
        extra = prob.concurrency - 1.0 if self.split else 0.0
        self.extra = {g: 0.0 if spans_ranks(self.stages[g]) else extra for g in (ENCODE, DECODE)}
        self.coupling = prob.profile.waa_period_factor if self.split else 1.0
        self.on_compute = prob.profile.handoff_on_compute
        # Two processes on one device (Splitwiser): each step priced on its share, slowed while the other computes.
        pricing = getattr(policy_module(plan.schedule.policy), "phase_pricing", None)
        self.pricing = None if pricing is None else pricing(prob, plan.schedule)
        if self.pricing is not None:  # its measured interference stands for WAA's lockstep calibration
            self.coupling = 1.0
        self.drivers: list[_Driver] = []
        # WAA state: the encode group's stages, its compute intervals, its batches and the decode group's merges.
        self.free = np.zeros(len(self.stages[ENCODE]))
        self.busy: list[tuple[float, float]] = []
        self.batches: list[tuple[tuple[int, ...], float, float, float]] = []  # rids, start, first tokens, hand-off
        self.ended = False
        self.merges: list[float] = []
        self.last_dec = 0.0

    def arrived_by(self, t: float) -> int:
        return int(np.searchsorted(self.arrive, t, side="right"))

    def prompt(self, rid: int) -> tuple[int, ...]:
        if self.prompts is not None:
            return tuple(self.prompts[rid])
        return (-1 - rid,) + (0,) * (int(self.ledger.inp[rid]) - 1)  # distinct from every other request's

    # --- the loop -----------------------------------------------------------------------------------------

    def run(self) -> DriverStats:
        groups = driver_groups(self.plan, self.control)
        order = {ENCODE: 0, MAIN: 1, DECODE: 2}
        drivers = []
        for g, fn in groups.items():
            d = _Driver(g, None, order[g])
            d.gen = fn(_View(self, d, len(self.stages[g])))
            drivers.append(d)
        self.drivers = drivers
        stats = None
        while True:
            ready = [(d.t, d.order, i) for i, d in enumerate(drivers) if not d.finished and self._unblock(d)]
            if not ready:
                if all(d.finished for d in drivers):
                    break
                raise ExeGPTError("simulated drivers are deadlocked: "
                                  + ", ".join(f"{d.group} waits on {type(d.blocked).__name__}"
                                              for d in drivers if not d.finished))
            d = drivers[min(ready)[2]]
            if self.log is not None and d.pending is not None:
                self.log.append(decision(d.group, d.pending, d.result))
            if d.t > self.horizon_s:  # cut short: the report reads the completions alone
                stats = self._cut(drivers)
                break
            try:
                action = d.gen.send(d.result)
            except StopIteration as stop:
                d.finished = True
                stats = stop.value if stop.value is not None else stats
                continue
            d.pending = action
            t_before = d.t
            d.result = self._execute(d, action)
            d.last, d.last_s = action, d.t - t_before
        if stats is None:
            raise ExeGPTError(f"policy {self.plan.schedule.policy.value}: no driver returned its statistics")
        return stats

    def _cut(self, drivers: list[_Driver]) -> DriverStats:
        """The statistics of a run cut at the horizon: each driver is closed and returns none, so the report
        reads the whole run's completions."""
        for d in drivers:
            d.gen.close()
        return DriverStats((), (), None)

    def _unblock(self, d: _Driver) -> bool:
        """Whether ``d`` can go on; resolves what it waited for when that is now there."""
        if d.blocked is None:
            return True
        if isinstance(d.blocked, AwaitCredit):
            if d.credits < len(self.merges):
                d.t = max(d.t, self.merges[d.credits])
                d.credits += 1
                d.blocked = None
                return True
            return False
        k = len(self.merges)
        if k < len(self.batches):
            if isinstance(d.blocked, Peek):
                d.t = max(d.t, self._ready(k))
                d.result = self.batches[k][0]
            else:
                d.result = self._merge(d, k)
            d.blocked = None
            return True
        if self.ended:
            d.result = None
            d.blocked = None
            return True
        return False

    def _execute(self, d: _Driver, action):
        if isinstance(action, Prefill):
            if d.group == ENCODE:
                self._encode_batch(d, action.rids)
            else:
                d.t = self._prefill(self.stages[d.group], list(action.rids), action.parts, d.t, action.resume,
                                    action.sp)
            if not action.resume:
                self._take(action.rids)
            return None
        if isinstance(action, Evict):
            if self.prefix is not None:
                for r in action.rids:
                    self.prefix.release(r)
            return None
        if isinstance(action, Chunk):
            new = [r for r, s, _ in action.items if not self._taken(r)]
            self._take(new)
            if self.prefix is not None:
                for r, s, _ in action.items:
                    if r in new:
                        self.prefix.admit(r, s)
            t0 = d.t
            if action.overlap and isinstance(d.last, Decode) and d.last_s is not None:
                t0 -= d.last_s  # alongside the decode iteration it follows: the step ends with the longer one
            d.t = max(d.t, self._chunks(action.items, action.parts, t0, action.sp, set(new)))
            if self.prefix is not None:
                for r, s, m in action.items:
                    if s + m == self.ledger.inp[r]:
                        self.prefix.publish(r)
            return None
        if isinstance(action, Decode):
            return self._decode(d, action)
        if isinstance(action, Compact):
            if self.prefix is not None:
                for r in [r for r in self.prefix.held if self.ledger.finished[r]]:
                    self.prefix.release(r)
            return None
        if isinstance(action, WaitArrival):
            nxt = self.arrived_by(d.t)
            if nxt < len(self.runnable):
                d.t = max(d.t, float(self.arrive[nxt]))
            return None
        if isinstance(action, Peek) and not action.wait:
            k = len(self.merges)
            if k < len(self.batches):
                return self.batches[k][0] if self._ready(k) <= d.t else ()
            return None if self.ended else ()
        if isinstance(action, (AwaitCredit, Merge, Peek)):
            d.blocked = action
            return None
        if isinstance(action, EndHandOffs):
            self.ended = True
            return None
        module = policy_module(self.plan.schedule.policy)
        if hasattr(module, "simulate"):  # a policy's own action (PipeInfer's ``Speculate``), priced by the policy
            return module.simulate(self, d, action)
        raise ExeGPTError(f"the simulated engine cannot execute {action!r}")

    def _taken(self, rid: int) -> bool:
        """Whether a prefill took ``rid`` (it is runnable)."""
        return rid in self.took or rid in self.done_ids

    def _take(self, rids) -> None:
        """Marks ``rids`` taken; they must be waiting (runnable and not taken; the driver saw them arrive)."""
        rids = [int(r) for r in rids]
        if len(set(rids)) < len(rids) or any(r in self.took or r in self.done_ids or r not in self.serving
                                             for r in rids):
            raise ExeGPTError(f"a prefill must take waiting requests, got {rids[:8]}")
        self.took.update(rids)
        while self.taken < len(self.runnable) and int(self.runnable[self.taken]) in self.took:
            self.took.discard(int(self.runnable[self.taken]))
            self.done_ids.add(int(self.runnable[self.taken]))
            self.taken += 1
