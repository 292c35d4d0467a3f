"""RunReport: what a run measured, by the runner or by the simulated engine, with the metric names of
``exegpt.plan.Estimate``.

All times are seconds from the start of the run, on one clock. Per request: its arrival, queueing delay (arrival
to the start of its prefill), time to first token (TTFT, from arrival), time per output token (TPOT: first to
last token over the tokens after the first) and end-to-end latency (arrival to last token); the report holds
their p50 / p90 / p99 and the share of requests meeting an ``exegpt.slo`` bound.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from .errors import ExeGPTError
from .jsonfile import JSONFile
from .plan import _UNBOUNDED, Estimate
from .rules import SteadyWindow, steady_rate

REPORT_SCHEMA = 2
FINISHED = "finished"
FAILED = "failed"


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request's outcome and timeline."""

    id: int
    input_len: int
    output_len: int
    """Target output length (tokens, the prefill's token included)."""
    status: str
    """'finished' or 'failed'."""
    reason: str = ""
    """Why a failed request failed; empty when finished."""
    arrival_s: float = 0.0
    """When it arrived (seconds from the run's start)."""
    encode_start_s: float | None = None
    """When its encode (prefill) started."""
    first_token_s: float | None = None
    """When its first token (from the prefill) was produced."""
    finish_s: float | None = None
    """When its last token was produced."""
    num_generated: int = 0
    """Tokens generated (== output_len when forced; fewer when stopped at EOS)."""
    latency_len_token_s: float | None = None
    """When its ``latency_len``-th token was produced (None if it generated fewer)."""
    tokens: tuple[int, ...] | None = None
    """The greedy tokens, when the run kept them."""

    def __post_init__(self):
        if self.status not in (FINISHED, FAILED):
            raise ExeGPTError(f"request {self.id}: status {self.status!r} must be 'finished' or 'failed'")
        if self.status == FAILED and not self.reason:
            raise ExeGPTError(f"request {self.id}: a failed request needs a reason")

    @property
    def finished(self) -> bool:
        return self.status == FINISHED

    @property
    def queue_s(self) -> float:
        """Arrival to the start of its prefill (NaN if it never started)."""
        return math.nan if self.encode_start_s is None else self.encode_start_s - self.arrival_s

    @property
    def ttft_s(self) -> float:
        """Time to first token, from arrival (NaN without one)."""
        return math.nan if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float:
        """Time per output token after the first: (last - first token) / (tokens - 1); NaN unless finished
        with at least two tokens."""
        if self.finish_s is None or self.first_token_s is None or self.num_generated < 2:
            return math.nan
        return (self.finish_s - self.first_token_s) / (self.num_generated - 1)

    @property
    def e2e_s(self) -> float:
        """Arrival to last token (NaN unless finished)."""
        return math.nan if self.finish_s is None else self.finish_s - self.arrival_s


@dataclass(frozen=True, slots=True)
class Percentiles:
    """p50 / p90 / p99 and mean of one per-request metric over the finished requests (NaN: none)."""

    p50: float = math.nan
    p90: float = math.nan
    p99: float = math.nan
    mean: float = math.nan

    @classmethod
    def of(cls, values) -> Percentiles:
        v = np.asarray([x for x in values if not math.isnan(x)], dtype=float)
        if not v.size:
            return cls()
        p50, p90, p99 = np.percentile(v, [50, 90, 99])
        return cls(float(p50), float(p90), float(p99), float(v.mean()))

    def at(self, pct: float) -> float:
        """The stored percentile ``pct`` (50, 90 or 99)."""
        try:
            return {50: self.p50, 90: self.p90, 99: self.p99}[pct]
        except KeyError:
            raise ExeGPTError(f"percentile {pct!r} is not kept; expected 50, 90 or 99") from None


@dataclass(frozen=True, slots=True)
class RunReport(JSONFile):
    """Performance of one run, measured (the runner) or simulated (``exegpt.sim``); ``throughput_seq_s`` ...
    ``decode_batch`` compare field by field with the plan's ``Estimate``."""

    policy: str
    throughput_seq_s: float
    """Completed sequences per second over the steady window (10 %..90 % completion times)."""
    throughput_tok_s: float
    """Generated tokens per second over the same window."""
    latency_s: float
    """Worst measured time, from encode start, to the ``latency_len``-th token among requests at least
    that long (the paper's bound is on this worst case). NaN when no request is that long."""
    latency_len: int
    encode_stage_s: float
    """Mean measured encode phase time (RRA, static) or encode batch time (WAA)."""
    decode_step_s: float
    """Mean measured time of one decode iteration of the whole decode batch."""
    decode_batch: float
    """Mean rows per decode iteration."""
    latency_p50_s: float = math.nan
    """Median of the same per-request latencies as ``latency_s``."""
    queue: Percentiles = Percentiles()
    """Queueing delay (s): arrival to prefill start."""
    ttft: Percentiles = Percentiles()
    """Time to first token (s), from arrival."""
    tpot: Percentiles = Percentiles()
    """Time per output token after the first (s)."""
    e2e: Percentiles = Percentiles()
    """End-to-end latency (s): arrival to last token."""
    engine: str = "runner"
    """'runner' (measured) or 'simulated' (``exegpt.sim``)."""
    decisions: tuple[str, ...] = field(default=(), repr=False)
    """The driver's actions in order, when the run logged them (``log_decisions``): the engines' conformance."""
    makespan_s: float = 0.0
    """From the first encode to the last token."""
    overall_seq_s: float = 0.0
    """Finished requests / makespan."""
    steady_start_s: float = math.nan
    steady_end_s: float = math.nan
    """The steady window the throughput, encode and decode figures were taken over (NaN: the 10 %..90 %
    completion window for throughput and the whole run for the rest)."""
    num_finished: int = 0
    num_failed: int = 0
    num_ranks: int = 1
    estimate: Estimate | None = None
    """The plan's prediction, for comparison."""
    requests: tuple[RequestRecord, ...] = field(default=(), repr=False)
    drift: tuple = field(default=(), repr=False)
    """The drifts the run detected and what was re-planned (``exegpt.drift.DriftEvent``), when it watched for them."""
    speculation: dict = field(default_factory=dict, repr=False, compare=False)
    """Speculative decoding's counts (``runner.spec_head.speculation_stats``): runs, cancellations, acceptance,
    KV rolled back, each stage's and the drafter's work."""
    cached_tokens: int = 0
    """Prompt tokens read from the run's prefix cache instead of prefilled (``exegpt.radix``)."""
    notes: tuple[str, ...] = field(default=(), compare=False)
    """One line each about how the device ran the plan (processes sharing a GPU: whether MPS enforced their
    shares, ``runner.colocate.mps_status``)."""
    _what = "report"

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("requests", "estimate", "drift")}
        d = {k: ({a: _enc(b) for a, b in asdict(v).items()} if isinstance(v, Percentiles) else _enc(v))
             for k, v in d.items()}
        d["schema"] = REPORT_SCHEMA
        d["estimate"] = None if self.estimate is None else {k: _enc(v) for k, v in asdict(self.estimate).items()}
        d["requests"] = [{k: _enc(v) for k, v in asdict(r).items()} for r in self.requests]
        d["drift"] = [{k: _enc(v) for k, v in asdict(e).items()} for e in self.drift]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RunReport:
        if d.get("schema") != REPORT_SCHEMA:
            raise ExeGPTError(f"report schema {d.get('schema')!r} is not supported; expected {REPORT_SCHEMA}")
        try:
            d = dict(d)
            d.pop("schema")
            reqs = tuple(RequestRecord(**{**r, "tokens": None if r.get("tokens") is None else tuple(r["tokens"])})
                         for r in d.pop("requests"))
            est = d.pop("estimate")
            if est is not None:
                est = dict(est)
                est["memory_bytes"] = tuple(est.get("memory_bytes") or ())
                est = Estimate(**{k: (math.inf if k in _UNBOUNDED and v is None else _dec(v))
                                  for k, v in est.items()})
            floats = {f.name for f in fields(cls) if f.type in ("float", float)}
            d = {k: (_dec(v) if k in floats else v) for k, v in d.items()}
            for k in _PERCENTILE_FIELDS:
                if k in d:
                    d[k] = Percentiles(**{a: _dec(b) for a, b in d[k].items()})
            d["decisions"] = tuple(d.get("decisions", ()))
            d["notes"] = tuple(d.get("notes", ()))
            from .drift import DriftEvent  # the monitor's module, imported only when a report is read

            d["drift"] = tuple(DriftEvent(**{k: _dec(v) for k, v in e.items()}) for e in d.get("drift", ()))
            return cls(**d, estimate=est, requests=reqs)
        except (KeyError, TypeError) as e:
            raise ExeGPTError(f"report JSON is missing or has a wrong field: {e}") from None

    def table(self) -> str:
        """A readable summary: measured values, and the plan's predictions beside them when known."""
        rows = [("throughput (seq/s)", "throughput_seq_s", 1.0), ("throughput (tok/s)", "throughput_tok_s", 1.0),
                (f"latency to token {self.latency_len} (ms, max)", "latency_s", 1e3),
                ("encode stage (ms)", "encode_stage_s", 1e3), ("decode step (ms)", "decode_step_s", 1e3),
                ("decode batch (rows)", "decode_batch", 1.0)]
        side = "simulated" if self.engine == "simulated" else "measured"
        out = [f"{'metric':<32}{'predicted':>12}{side:>12}{side[:4] + '/pred':>11}"]
        for label, name, scale in rows:
            m = getattr(self, name) * scale
            p = getattr(self.estimate, name) * scale if self.estimate is not None else math.nan
            ratio = m / p if p and not math.isnan(p) and not math.isinf(p) else math.nan
            out.append(f"{label:<32}{_fmt(p):>12}{_fmt(m):>12}{_fmt(ratio):>11}")
        out.append(f"{'latency p50 (ms)':<32}{'':>12}{_fmt(self.latency_p50_s * 1e3):>12}")
        for label, pc in (("TTFT", self.ttft), ("TPOT", self.tpot), ("end-to-end", self.e2e),
                          ("queueing", self.queue)):
            out.append(f"{label + ' p50/p90/p99 (ms)':<32}{'':>12}"
                       f"{' / '.join(_fmt(x * 1e3) for x in (pc.p50, pc.p90, pc.p99)):>24}")
        out.append(f"{'makespan (s)':<32}{'':>12}{_fmt(self.makespan_s):>12}")
        out.append(f"{'overall rate (seq/s)':<32}{'':>12}{_fmt(self.overall_seq_s):>12}")
        out.append(f"requests: {self.num_finished} finished, {self.num_failed} failed "
                   f"({self.policy}, {self.num_ranks} rank{'s' if self.num_ranks > 1 else ''})")
        reasons = sorted({r.reason for r in self.requests if r.status == FAILED})
        for reason in reasons[:5]:
            out.append(f"  failed: {reason}")
        return "\n".join(out)

    @property
    def num_requests(self) -> int:
        return self.num_finished + self.num_failed

    def attainment(self, slo) -> float:
        """The share of requests (failed ones count as misses) that meet ``slo``: an ``exegpt.slo`` form with
        per-request bounds (``RequestSLO``, ``CompletionSLO``)."""
        return slo.attainment(self.requests)


_PERCENTILE_FIELDS = ("queue", "ttft", "tpot", "e2e")


def build_report(policy: str, records: list[RequestRecord], latency_len: int, encode_times_s: list[float],
                 decode_iters: list[tuple[float, int]], num_ranks: int = 1,
                 estimate: Estimate | None = None, steady: SteadyWindow | None = None,
                 engine: str = "runner", decisions: tuple[str, ...] = (), drift: tuple = (),
                 cached_tokens: int = 0) -> RunReport:
    """Aggregate per-request records and phase timings into a RunReport.

    Args:
        encode_times_s: one entry per encode phase (or WAA encode batch).
        decode_iters: (seconds, rows) per decode iteration of the whole decode batch.
        steady: the executor's steady window. When at least ``MIN_STEADY_FINISHES`` requests finished in it,
            throughput is their count over its length and the encode and decode figures are its phases'
            (the plan estimates the steady state); otherwise the 10 %..90 % completion window and the whole run.
            Latency is always over every request.
        drift: the run's drift events (``exegpt.drift.DriftEvent``).
    """
    records = sorted(records, key=lambda r: r.id)
    done = [r for r in records if r.status == FINISHED]
    finish = np.sort(np.array([r.finish_s for r in done], dtype=float))
    starts = [r.encode_start_s for r in records if r.encode_start_s is not None]
    makespan = float(finish[-1] - min(starts)) if len(finish) and starts else 0.0
    overall = len(done) / makespan if makespan > 0 else math.nan
    tokens_per_seq = float(np.mean([r.num_generated for r in done])) if done else math.nan
    seq_s = steady_rate(finish)
    if math.isnan(seq_s):
        seq_s = overall
    window = (math.nan, math.nan)
    rate = steady.rate(finish, encode_times_s, decode_iters) if steady is not None else None
    if rate is not None:
        seq_s = rate
        encode_times_s, decode_iters = encode_times_s[steady.encodes], decode_iters[steady.decode_iters]
        window = (steady.start_s, steady.end_s)
    lat = np.array([r.latency_len_token_s - r.encode_start_s for r in done
                    if r.latency_len_token_s is not None and r.encode_start_s is not None], dtype=float)
    rows = sum(n for _, n in decode_iters)
    return RunReport(
        policy=policy, throughput_seq_s=seq_s, throughput_tok_s=seq_s * tokens_per_seq,
        latency_s=float(lat.max()) if lat.size else math.nan, latency_len=int(latency_len),
        encode_stage_s=float(np.mean(encode_times_s)) if encode_times_s else math.nan,
        decode_step_s=float(np.mean([t for t, _ in decode_iters])) if decode_iters else math.nan,
        decode_batch=rows / len(decode_iters) if decode_iters else 0.0,
        latency_p50_s=float(np.median(lat)) if lat.size else math.nan,
        queue=Percentiles.of(r.queue_s for r in done), ttft=Percentiles.of(r.ttft_s for r in done),
        tpot=Percentiles.of(r.tpot_s for r in done), e2e=Percentiles.of(r.e2e_s for r in done),
        engine=engine, decisions=tuple(decisions), makespan_s=makespan,
        overall_seq_s=overall, steady_start_s=window[0], steady_end_s=window[1], num_finished=len(done),
        num_failed=len(records) - len(done), num_ranks=num_ranks,
        estimate=estimate, requests=tuple(records), drift=tuple(drift), cached_tokens=int(cached_tokens))


def _enc(v):
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    if isinstance(v, tuple):
        return list(v)
    return v


def _dec(v):
    return math.nan if v is None else v


def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.4g}"
