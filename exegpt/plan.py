"""Estimate, SearchStats and Plan: what the solver returns and the runner executes (``Stage``: ``exegpt.stages``)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING

from .bound import LatencyBound
from .errors import ExeGPTError
from .jsonfile import JSONFile, known_fields
from .policies import schedule_from_dict
from .schedule import schedule_to_dict
from .slo import slo_from_dict
from .stages import Stage
from .workload import Workload

if TYPE_CHECKING:
    from .policies import Schedule

PLAN_SCHEMA = 1
PLAN_FIELDS = ("schema", "schedule", "estimate", "bound", "profile_id", "model", "devices", "workload", "stages",
               "search", "slo", "slo_check")


@dataclass(frozen=True, slots=True)
class Estimate:
    """Predicted steady-state performance of a schedule. ``runner.RunReport`` uses the same names."""

    throughput_seq_s: float
    """Completed sequences per second."""
    throughput_tok_s: float
    """Generated (output) tokens per second."""
    latency_s: float
    """Time to generate an output of ``latency_len`` tokens, from the start of its encoding."""
    latency_len: int
    """The output length the bound applies to (the bound's length quantile)."""
    encode_stage_s: float
    """Time of one encode phase (RRA, static) or of the slowest encode stage (WAA)."""
    decode_step_s: float
    """Time of one decode iteration of the whole decode batch."""
    decode_batch: float
    """B_D: expected rows of a decode iteration."""
    refill_batch: float = 0.0
    """RRA: rows the decode batch is refilled to at each encode phase (B_E E[ceil(k/N_D)]); the
    runner's refill target. Equal to ``decode_batch`` for the other policies."""
    kv_tokens: float = math.inf
    """Paged policies (continuous batching): the KV-cache tokens one pipeline's memory holds after weights and
    activations, the block pool the driver admits against."""
    memory_bytes: tuple[float, ...] = ()
    """Peak bytes per pipeline stage device (weights + KV cache + activations)."""
    memory_capacity_bytes: float = math.inf

    def meets(self, bound: LatencyBound) -> bool:
        return self.latency_s <= bound.bound_s

    @property
    def memory_ok(self) -> bool:
        return all(m <= self.memory_capacity_bytes for m in self.memory_bytes)


_UNBOUNDED = ("memory_capacity_bytes", "kv_tokens")
"""Estimate fields whose infinity (no limit) is written as null in JSON."""


@dataclass(frozen=True, slots=True)
class SearchStats:
    method: str
    """'branch_and_bound' or 'exhaustive' (or 'given' for a schedule evaluated as is)."""
    candidates_evaluated: int
    wall_s: float
    space_size: int = 0
    """Points in the search space (all policies, TP configurations and box points)."""
    boxes_pruned: int = 0
    replay_requests: int = 0
    """``find_schedule(verify_requests=n)``: the requests the pick was replayed on (0: not replayed)."""
    replay_latency_s: float | None = None
    per_policy: tuple = ()
    """(policy, the best value it reached) for every policy searched, when several were: under the paper's bound
    the estimated throughput (when the grid policies were searched too: the default); under forms (b) and (c) the simulated throughput or goodput, 0 where none of its
    schedules kept the SLO (form (b), (c): or its estimates could not beat the pick)."""
    """The worst latency to the bound length among them (the simulated engine, ``exegpt.sim``; NaN if none
    reached it)."""


@dataclass(frozen=True, slots=True)
class SLOCheck:
    """What a plan records of the SLO it was chosen for: the form, whether and by how much it holds."""

    form: str
    """'quantile_length' (a), 'completion' (b) or 'request' (c)."""
    description: str
    holds: bool
    margin: float
    """(bound - achieved) / bound, the tightest over the SLO's bounds."""
    achieved: tuple[float, ...]
    """What was measured against each bound (s)."""
    goodput_rps: float = math.nan
    """(c): the highest Poisson rate (requests/s) at which it holds."""
    engine: str = "estimate"
    """Where it was checked: 'estimate' (analytic) or 'simulated'."""
    num_requests: int = 0

    def to_dict(self) -> dict:
        return {"form": self.form, "description": self.description, "holds": self.holds,
                "margin": _num(self.margin), "achieved": [_num(x) for x in self.achieved],
                "goodput_rps": _num(self.goodput_rps), "engine": self.engine, "num_requests": self.num_requests}

    @classmethod
    def of_bound(cls, bound: LatencyBound, est: Estimate) -> SLOCheck:
        """The check of form (a), the paper's bound, on an estimate."""
        return cls("quantile_length", f"the p{bound.length_quantile * 100:g}-length output ({est.latency_len} tokens) "
                   f"within {bound.bound_s:g} s", est.latency_s <= bound.bound_s,
                   (bound.bound_s - est.latency_s) / bound.bound_s if math.isfinite(bound.bound_s) else math.inf,
                   (est.latency_s,))

    @classmethod
    def from_dict(cls, d: dict) -> SLOCheck:
        known_fields(d, [f.name for f in fields(cls)], "a plan's slo_check")
        return cls(d["form"], d["description"], bool(d["holds"]), _den(d["margin"]),
                   tuple(_den(x) for x in d["achieved"]), _den(d.get("goodput_rps")), d.get("engine", "estimate"),
                   int(d.get("num_requests", 0)))


def _num(x):
    """A float for JSON: None for NaN, "inf" / "-inf" for infinities."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    return str(x) if isinstance(x, float) and math.isinf(x) else x


def _den(x):
    return math.nan if x is None else float(x)


@dataclass(frozen=True)
class Plan(JSONFile):
    """A schedule with its estimate, the bound it was chosen for, and where it came from.
    ``Plan.from_json(plan.to_json()) == plan``; the runner executes ``schedule`` on ``stages``."""

    schedule: Schedule
    estimate: Estimate
    bound: LatencyBound
    profile_id: str
    """model@device of the profile the estimate came from."""
    model: str
    devices: str
    """Cluster label such as 4xA40."""
    workload: Workload
    stages: tuple[Stage, ...]
    """Layer placement: RRA/static stages in pipeline order; WAA encode stages, then decode stages."""
    search: SearchStats = field(default_factory=lambda: SearchStats("given", 1, 0.0))
    slo: object | None = None
    """The SLO the plan was chosen for when it is not ``bound``'s form (``exegpt.slo``: CompletionSLO,
    RequestSLO); None: the paper's bound, ``bound``."""
    slo_check: SLOCheck | None = None
    """Which SLO form the plan satisfies, whether it holds and by what margin."""
    _what = "plan"

    def to_dict(self) -> dict:
        est = asdict(self.estimate)
        est["memory_bytes"] = list(est["memory_bytes"])
        for k in _UNBOUNDED:
            if math.isinf(est[k]):
                est[k] = None
        return {"schema": PLAN_SCHEMA, "schedule": schedule_to_dict(self.schedule), "estimate": est,
                "bound": self.bound.to_dict(), "profile_id": self.profile_id, "model": self.model,
                "devices": self.devices, "workload": self.workload.to_dict(),
                "stages": [asdict(s) for s in self.stages], "search": asdict(self.search),
                "slo": None if self.slo is None else self.slo.to_dict(),
                "slo_check": None if self.slo_check is None else self.slo_check.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        known_fields(d, PLAN_FIELDS, "plan JSON")
        if d.get("schema") != PLAN_SCHEMA:
            raise ExeGPTError(f"plan schema {d.get('schema')!r} is not supported; expected {PLAN_SCHEMA}")
        try:
            est = dict(d["estimate"])
            est["memory_bytes"] = tuple(est.get("memory_bytes", ()))
            for k in _UNBOUNDED:
                if est.get(k) is None:
                    est[k] = math.inf
            return cls(schedule=schedule_from_dict(d["schedule"]), estimate=Estimate(**est),
                       bound=LatencyBound.from_dict(d["bound"]), profile_id=d["profile_id"], model=d["model"],
                       devices=d["devices"], workload=Workload.from_dict(d["workload"]),
                       stages=tuple(Stage(**s) for s in d["stages"]),
                       search=SearchStats(**{**d["search"], "per_policy": tuple(tuple(x) for x in
                                                                                d["search"].get("per_policy", ()))}),
                       slo=None if d.get("slo") is None else slo_from_dict(d["slo"]),
                       slo_check=None if d.get("slo_check") is None else SLOCheck.from_dict(d["slo_check"]))
        except (KeyError, TypeError) as e:
            raise ExeGPTError(f"plan JSON is missing or has a wrong field: {e}") from None
