"""Workload drift: a monitor of the (input, output) lengths of the requests a run has finished, tested against the
lengths its plan was made for.

The monitor reads requests in admission order, not in the order they finish: short outputs finish first, so the
latest finished requests are a length-biased sample even when nothing drifts. A request enters the window once
every request admitted before it has finished (the window is a run of consecutive admissions, an unbiased sample of
what arrived), and the window keeps the latest ``window`` of them, forgetting older ones.

Every ``step`` new requests (once it holds ``min_samples``) the window's input lengths and its output lengths are each
tested against a sample of the plan's workload with a two-sample test (scipy's Kolmogorov-Smirnov, or the
Anderson-Darling k-sample test). The stated false-alarm rate: while the lengths follow the plan, the chance of an
alarm among the tests made over any ``window`` consecutive requests is at most ``alpha`` (each test runs at level
``alpha * step / (2 * window)``: a union bound over its two marginals and the ``window / step`` tests that read a
request); over a run of N requests, at most ``alpha * N / window`` false alarms are expected. Lengths are whole
numbers with ties, for which both tests are conservative.

After an alarm the monitor estimates where the new distribution began (the split of the window whose newer part
departs most from the plan, scaled by the square root of its size) and reports the mean lengths after it, which the
re-planner (``exegpt.replan``) fits the new workload to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from .errors import ExeGPTError
from .workload import Workload

MIN_SAMPLES = 8
"""The fewest requests a test may read (``MonitorOptions.min_samples``)."""
TESTS = ("ks", "ad")
AD_FLOOR = 0.001
"""scipy's Anderson-Darling k-sample p-values are floored at this level: a per-test level below it never alarms."""
MARGINALS = ("input", "output")


@dataclass(frozen=True, slots=True)
class MonitorOptions:
    """How the drift monitor tests the lengths a run serves."""

    window: int = 128
    """Requests the window keeps (the latest in admission order); older ones are forgotten."""
    min_samples: int = 32
    """Requests the window must hold before it is tested; at least ``MIN_SAMPLES``, at most ``window``."""
    alpha: float = 0.01
    """The false-alarm rate: at most this chance of an alarm over any ``window`` consecutive requests while the
    lengths follow the plan. In (0, 1)."""
    step: int = 8
    """New requests between two tests (1 .. ``window``)."""
    test: str = "ks"
    """'ks' (``scipy.stats.ks_2samp``) or 'ad' (``scipy.stats.anderson_ksamp``)."""
    reference_size: int = 2000
    """Requests drawn (seeded) from the plan's workload as the test's other sample."""
    seed: int = 0
    """Seeds the reference sample."""

    def __post_init__(self):
        for name in ("window", "min_samples", "step", "reference_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ExeGPTError(f"drift monitor: {name}={v!r} must be a whole number >= 1")
        if self.min_samples < MIN_SAMPLES:
            raise ExeGPTError(f"drift monitor: min_samples={self.min_samples} is below the {MIN_SAMPLES} requests "
                              f"a test needs")
        if self.window < self.min_samples:
            raise ExeGPTError(f"drift monitor: window={self.window} is smaller than min_samples={self.min_samples}; "
                              f"the window must hold at least the minimum sample count")
        if self.step > self.window:
            raise ExeGPTError(f"drift monitor: step={self.step} exceeds window={self.window}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha < 1:
            raise ExeGPTError(f"drift monitor: significance level alpha={self.alpha!r} must be in (0, 1)")
        if self.test not in TESTS:
            raise ExeGPTError(f"drift monitor: test={self.test!r} must be one of {', '.join(TESTS)}")
        if self.test == "ad" and self.test_level < AD_FLOOR:
            raise ExeGPTError(f"drift monitor: the Anderson-Darling test's p-values stop at {AD_FLOOR}, above the "
                              f"per-test level {self.test_level:.2g} (alpha * step / (2 * window)); raise alpha or "
                              f"step, or use test='ks'")

    @property
    def test_level(self) -> float:
        """The level of each test of one marginal: ``alpha * step / (2 * window)``."""
        return self.alpha * self.step / (2 * self.window)


@dataclass(frozen=True, slots=True)
class Alarm:
    """A detected drift ('drift'), or the refit that follows one once the window holds only requests read after it
    ('refit'): a test fires when its sample happens to be extreme, so the means read at a drift alarm lean that way;
    the refit reads a whole window that had no say in the alarm."""

    kind: str
    observed: int
    """Requests (in admission order) the monitor had read when it alarmed."""
    marginal: str
    """'input' or 'output': the length whose test alarmed (the smaller p-value)."""
    p_value: float
    statistic: float
    change_at: int
    """The estimated admission position of the first request of the new distribution."""
    input_mean: float
    output_mean: float
    """Mean lengths of the window's requests from ``change_at`` on (tokens)."""
    num_after: int
    """Requests those means are over."""


class DriftMonitor:
    """Windowed two-sample tests of served lengths against a workload (module docstring)."""

    def __init__(self, workload: Workload, options: MonitorOptions = MonitorOptions()):
        self.options = options
        self._pending: dict[int, tuple[int, int]] = {}  # finished requests waiting for an earlier one
        self.observed = 0  # the next admission position to enter the window
        self._since_test = 0
        self._refit: tuple[int, str] | None = None  # (position, marginal) of the refit due after a drift alarm
        self._window: list[tuple[int, int]] = []  # (input, output) of consecutive admissions, oldest first
        self.reset(workload)

    def reset(self, workload: Workload, alarm: Alarm | None = None) -> None:
        """Test against ``workload`` from now on (after a re-plan). The window keeps the requests from ``alarm``'s
        change on (none without an alarm); after a drift alarm, a refit is due once a whole window of requests after
        the alarm has been read (they did not choose when the test fired)."""
        o = self.options
        rng = np.random.default_rng(o.seed)
        self.workload = workload
        self.reference = (workload.input_len.sample(o.reference_size, rng),
                          workload.output_len.sample(o.reference_size, rng))
        first = self.observed - len(self._window)  # the position of the window's oldest request
        self._window = self._window[max(0, alarm.change_at - first):] if alarm is not None else []
        self._since_test = 0
        if alarm is not None:
            self._refit = (alarm.observed + o.window, alarm.marginal) if alarm.kind == "drift" else None

    def observe(self, position: int, input_len: int, output_len: int) -> Alarm | None:
        """The request admitted at ``position`` (0, 1, ... in admission order) finished with these lengths (tokens);
        returns the alarm if a test now rejects the plan's lengths."""
        for name, v in (("input_len", input_len), ("output_len", output_len)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ExeGPTError(f"drift monitor: {name}={v!r} of request {position} must be a whole number of "
                                  f"tokens >= 1")
        if isinstance(position, bool) or not isinstance(position, (int, np.integer)) or position < 0:
            raise ExeGPTError(f"drift monitor: position={position!r} must be a whole number >= 0")
        if position < self.observed or position in self._pending:
            raise ExeGPTError(f"drift monitor: request at position {position} was observed already")
        self._pending[int(position)] = (int(input_len), int(output_len))
        alarm = None
        while self.observed in self._pending:
            self._window.append(self._pending.pop(self.observed))
            self.observed += 1
            self._since_test += 1
            if len(self._window) > self.options.window:
                del self._window[0]
            if alarm is None and self._refit is not None and self.observed >= self._refit[0]:
                alarm = self._refit_alarm()
            elif alarm is None and self._since_test >= self.options.step and len(self._window) >= \
                    self.options.min_samples:
                self._since_test = 0
                alarm = self._test()
        return alarm

    def samples(self) -> np.ndarray:
        """The window's (input, output) lengths, oldest first (``[n, 2]``)."""
        return np.asarray(self._window, dtype=np.int64).reshape(-1, 2)

    def p_values(self) -> tuple[float, float]:
        """The tests' p-values of the window as it is (input, output)."""
        x = self.samples()
        return tuple(self._test_one(x[:, i], self.reference[i])[1] for i in range(2))

    def _test_one(self, sample: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
        if self.options.test == "ks":
            r = stats.ks_2samp(sample, reference)
            return float(r.statistic), float(r.pvalue)
        if np.unique(np.concatenate([sample, reference])).size < 2:
            return 0.0, 1.0  # one length everywhere: nothing to tell apart
        r = stats.anderson_ksamp([sample, reference])
        return float(r.statistic), float(r.pvalue)

    def _test(self) -> Alarm | None:
        x = self.samples()
        results = [self._test_one(x[:, i], self.reference[i]) for i in range(2)]
        i = int(np.argmin([p for _, p in results]))
        stat, p = results[i]
        if p >= self.options.test_level:
            return None
        k = self._change_point(x[:, i], self.reference[i])
        after = x[k:]
        return Alarm("drift", self.observed, MARGINALS[i], p, stat, self.observed - len(x) + k,
                     float(after[:, 0].mean()), float(after[:, 1].mean()), len(after))

    def _refit_alarm(self) -> Alarm:
        x = self.samples()
        i = MARGINALS.index(self._refit[1])
        self._refit = None
        stat, p = self._test_one(x[:, i], self.reference[i])
        return Alarm("refit", self.observed, MARGINALS[i], p, stat, self.observed - len(x), float(x[:, 0].mean()),
                     float(x[:, 1].mean()), len(x))

    def _change_point(self, values: np.ndarray, reference: np.ndarray) -> int:
        """The split of the window whose newer part departs most from ``reference``: the largest KS distance times
        the square root of the newer part's size, over newer parts of at least ``MIN_SAMPLES``."""
        ref = np.sort(reference)
        best, at = -math.inf, 0
        for k in range(0, len(values) - MIN_SAMPLES + 1):
            tail = np.sort(values[k:])
            grid = np.union1d(tail, ref)
            d = np.abs(np.searchsorted(tail, grid, side="right") / len(tail)
                       - np.searchsorted(ref, grid, side="right") / len(ref)).max()
            score = d * math.sqrt(len(tail))
            if score > best:
                best, at = score, k
        return at


@dataclass(frozen=True, slots=True)
class DriftEvent:
    """One detected drift in a run, or the refit after one (``Alarm.kind``), and what the re-planner
    (``exegpt.replan``) made of it. Times are the run's clock (seconds from its start); estimates are on the fitted
    workload."""

    kind: str
    detected_s: float
    observed: int
    """Requests (in admission order) the monitor had read at the alarm."""
    change_at: int
    """The estimated admission position where the new lengths began."""
    marginal: str
    p_value: float
    input_ratio: float
    output_ratio: float
    """Fitted mean length over the one the run was planned for (input, output)."""
    before: str
    """The schedule in force before (``policies.describe``)."""
    after: str
    """The cheap move: the schedule applied without moving weights ('' none: not re-planning, nothing fits the
    layout, or the plan keeps the bound and the move adds less than ``DriftOptions.min_gain``)."""
    bound_s: float
    old_latency_s: float
    old_throughput_seq_s: float
    """The schedule in force, estimated on the fitted workload."""
    new_latency_s: float = math.nan
    new_throughput_seq_s: float = math.nan
    """The cheap move found, estimated on the fitted workload (also when not applied)."""
    move_s: float = math.nan
    """Wall seconds to fit the workload and find the cheap move."""
    applied_s: float = math.nan
    """When a driver took the cheap move (NaN: not re-planning, or the run ended first)."""
    full: str = ""
    """The full re-plan: the best schedule of any policy and layout for the fitted workload ('' none)."""
    full_throughput_seq_s: float = math.nan
    full_s: float = math.nan
    """Wall seconds of the full re-plan."""

    @property
    def full_gain(self) -> float:
        """The full re-plan's estimated throughput over the cheap move's: what a redeploy would add."""
        return self.full_throughput_seq_s / self.new_throughput_seq_s

    @property
    def old_keeps_bound(self) -> bool:
        return self.old_latency_s <= self.bound_s

    @property
    def new_keeps_bound(self) -> bool:
        return self.new_latency_s <= self.bound_s


@dataclass(frozen=True, slots=True)
class Segment:
    """What a run measured over a stretch of its requests (by admission position)."""

    num_requests: int
    num_finished: int
    throughput_seq_s: float
    """Completions per second between the stretch's 10 % and 90 % completion times (``rules.steady_rate``)."""
    latency_s: float
    """The worst time from encode start to each request's own bound-length token (``latency_len_token_s``;
    ``run_simulated(latency_lens=...)`` sets that length per request), NaN when none reached it."""


def segment(records, ids) -> Segment:
    """The ``Segment`` of a run's request ``records`` (``RunReport.requests``) whose ids are in ``ids``."""
    from .rules import steady_rate

    want = set(int(i) for i in ids)
    mine = [r for r in records if r.id in want]
    done = [r for r in mine if r.finished]
    lat = [r.latency_len_token_s - r.encode_start_s for r in done if r.latency_len_token_s is not None]
    return Segment(len(mine), len(done), steady_rate(np.sort([r.finish_s for r in done])),
                   max(lat) if lat else math.nan)
