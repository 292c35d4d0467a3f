"""Service-level objectives as users state them, and how a run or a plan is checked against them.

Three forms:
  (a) ``LatencyBound(bound_s, length_quantile)``: the paper's bound on the latency of the q-quantile-length output,
      from the start of its prefill (``exegpt.bound``; the default, checked on the analytic estimate);
  (b) ``CompletionSLO(bound_s, share)``: ``share`` of the requests finish within ``bound_s`` of the start of their
      prefill (their service latency; at saturation every request waits in the queue, so the queue is not
      counted);
  (c) ``RequestSLO(ttft_s, tpot_s, percentile)``: under arrivals at a rate, the ``percentile`` of time to first
      token (from arrival) is at most ``ttft_s`` and the same percentile of time per output token at most
      ``tpot_s``; the objective is goodput, the highest Poisson arrival rate at which it holds (DistServe's
      definition).
(b) and (c) are evaluated on the simulated engine (``exegpt.sim``). A request that failed counts as missing every
bound.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .bound import LatencyBound
from .errors import ExeGPTError
from .jsonfile import known_fields


class RunReport(Protocol):
    """What an SLO reads of a run (``exegpt.report.RunReport``, which imports this module through the plan): its
    per-request records."""

    requests: Sequence


def _positive(value, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isnan(value):
        raise ExeGPTError(f"{what} {value!r} must be a number of seconds > 0")


@dataclass(frozen=True, slots=True)
class CompletionSLO:
    """``share`` of requests finish within ``bound_s`` of their prefill's start."""

    bound_s: float
    share: float = 0.99

    def __post_init__(self):
        _positive(self.bound_s, "completion bound")
        if not isinstance(self.share, (int, float)) or not 0 < self.share < 1:
            raise ExeGPTError(f"share {self.share!r} of requests must be in (0, 1)")

    def describe(self) -> str:
        return f"{self.share:.0%} of requests finish within {self.bound_s:g} s of their prefill"

    def achieved(self, report: RunReport) -> float:
        """The ``share``-quantile of the requests' service latency (s; inf when too many failed)."""
        lat = [r.finish_s - r.encode_start_s if r.finished else math.inf for r in report.requests]
        return _quantile(lat, self.share)

    def attainment(self, records) -> float:
        return float(np.mean([r.finished and r.finish_s - r.encode_start_s <= self.bound_s
                              for r in records])) if records else math.nan

    def holds(self, report: RunReport) -> bool:
        return self.achieved(report) <= self.bound_s

    def margin(self, report: RunReport) -> float:
        """(bound - achieved) / bound: the share of the bound left (negative: missed)."""
        return (self.bound_s - self.achieved(report)) / self.bound_s

    def to_dict(self) -> dict:
        return {"form": "completion", "bound_s": self.bound_s, "share": self.share}


@dataclass(frozen=True, slots=True)
class RequestSLO:
    """The ``percentile`` of TTFT at most ``ttft_s`` and of TPOT at most ``tpot_s``, under arrivals."""

    ttft_s: float
    tpot_s: float
    percentile: float = 90.0

    def __post_init__(self):
        _positive(self.ttft_s, "TTFT bound")
        _positive(self.tpot_s, "TPOT bound")
        if not isinstance(self.percentile, (int, float)) or not 0 < self.percentile < 100:
            raise ExeGPTError(f"percentile {self.percentile!r} must be in (0, 100)")

    def describe(self) -> str:
        return f"p{self.percentile:g} TTFT <= {self.ttft_s:g} s and p{self.percentile:g} TPOT <= {self.tpot_s:g} s"

    def achieved(self, report: RunReport) -> tuple[float, float]:
        """(TTFT, TPOT) at the percentile, over every request (a failed one as infinitely late)."""
        q = self.percentile / 100
        ttft = [r.ttft_s if r.finished else math.inf for r in report.requests]
        tpot = [(r.tpot_s if r.num_generated > 1 else 0.0) if r.finished else math.inf
                for r in report.requests]
        return _quantile(ttft, q), _quantile(tpot, q)

    def attainment(self, records) -> float:
        """The share of requests meeting both bounds."""
        ok = [r.finished and r.ttft_s <= self.ttft_s and not (r.tpot_s > self.tpot_s) for r in records]
        return float(np.mean(ok)) if ok else math.nan

    def holds(self, report: RunReport) -> bool:
        ttft, tpot = self.achieved(report)
        return ttft <= self.ttft_s and tpot <= self.tpot_s

    def margin(self, report: RunReport) -> float:
        ttft, tpot = self.achieved(report)
        return min((self.ttft_s - ttft) / self.ttft_s, (self.tpot_s - tpot) / self.tpot_s)

    def to_dict(self) -> dict:
        return {"form": "request", "ttft_s": self.ttft_s, "tpot_s": self.tpot_s, "percentile": self.percentile}


SLO = LatencyBound | CompletionSLO | RequestSLO


def slo_from_dict(d: dict) -> SLO:
    form = d.get("form") if isinstance(d, dict) else None
    if form == "completion":
        known_fields(d, ("form", "bound_s", "share"), "a completion SLO")
        return CompletionSLO(float(d["bound_s"]), float(d.get("share", 0.99)))
    if form == "request":
        known_fields(d, ("form", "ttft_s", "tpot_s", "percentile"), "a request SLO")
        return RequestSLO(float(d["ttft_s"]), float(d["tpot_s"]), float(d.get("percentile", 90.0)))
    return LatencyBound.from_dict(d)


def _quantile(values, q: float) -> float:
    v = np.sort(np.asarray(values, dtype=float))
    if not v.size:
        return math.nan
    k = min(len(v) - 1, max(0, math.ceil(q * len(v)) - 1))  # the smallest value that q of the requests keep
    return float(v[k])
