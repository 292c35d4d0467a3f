"""The problem a search solves: the profile, model, devices, workload and bound, fixed while schedules vary.

``problem(dist, slo, model=..., devices=..., profile=...)`` resolves names (a model preset, "4xA40", the built-in
GPU profile) into a ``Problem``: the cost model over the profile and the workload's constants (decode iterations,
phases per query) every policy's estimate reads.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

import numpy as np

from .bound import LatencyBound, as_bound
from .checks import number
from .cost import CostModel, WorkloadStats
from .devices import Cluster, DeviceSpec, parse_cluster
from .errors import ExeGPTError
from .memory import MEMORY_FRACTION
from .models import ModelShape, get_model
from .phases import PhaseLengths, QueryRows, phases_per_query
from .profile import Kernel, Profile
from .workload import Workload

DEFAULT_MODEL = "opt-13b"
DEFAULT_DEVICES = "4xA40"


@dataclass(frozen=True, eq=False)
class Problem:
    """Everything fixed while schedules vary: profile, model, devices, workload and the bound."""

    profile: Profile
    model: ModelShape
    cluster: Cluster
    workload: Workload
    bound: LatencyBound
    cost: CostModel
    bound_cost: CostModel
    """The same costs on the profile's batching envelope: used only inside box bounds."""
    capacity_bytes: float
    latency_len: int
    """The output length the bound applies to (its length quantile)."""
    k_q: int
    """Decode iterations of a ``latency_len`` output."""
    phases: np.ndarray
    """phases[n] = E[ceil(k / n)]: decode phases a query spends in the batch at N_D = n (index 0 unused)."""
    mean_iters: float
    """E[k]: decode iterations per query."""
    phase_iters: PhaseLengths
    """phase_iters(B_E, N_D): decode iterations an RRA phase runs on average (at most N_D; ``exegpt.phases``)."""
    memo: dict = field(default_factory=dict, init=False, repr=False)
    """What the fixed parts alone determine (profile, model, workload, memory, cost models), computed once and shared
    by the problem's ``with_devices`` copies only (any other ``dataclasses.replace`` starts an empty one): layer
    placements and stage costs, keyed by what they depend on (``stages.place_stages``, ``stages._shared``)."""

    @classmethod
    def build(cls, workload: Workload, bound: LatencyBound, profile: Profile, model: ModelShape,
              cluster: Cluster, memory_fraction: float = MEMORY_FRACTION) -> Problem:
        number(memory_fraction, "memory_fraction", 0, 1, lo_open=True)
        if profile.kv_dtype is not None and profile.kv_dtype != (model.kv_dtype or model.dtype):
            model = dataclasses.replace(model, kv_dtype=profile.kv_dtype)  # the backend's cache, as profiled
        copies = {"packed_dtype": profile.packed_weight_dtype or "", "panel_dtype": profile.panel_weight_dtype or ""}
        if any(getattr(model, f) != d for f, d in copies.items()):
            model = dataclasses.replace(model, **copies)  # and its weights' extra copies
        if workload.max_total_len > model.max_seq_len:
            raise ExeGPTError(f"workload reaches {workload.max_total_len} tokens (prompt + output) but "
                              f"{model.name} supports {model.max_seq_len}")
        if model.is_encoder_decoder and not profile.has(Kernel.ATTN_CROSS):
            raise ExeGPTError(f"profile {profile.id} has no attn_cross table, which encoder-decoder "
                              f"model {model.name} needs")
        stats = WorkloadStats.of(workload, first_token_in_encode=not model.is_encoder_decoder)
        shift = 1 if not model.is_encoder_decoder else 0
        latency_len = workload.output_len.quantile(bound.length_quantile)
        k, p = stats.k_lengths, stats.k_probs
        phases = phases_per_query(k, p)
        memory = cluster.device.memory_bytes if profile.device_memory_bytes is None \
            else profile.device_memory_bytes
        return cls(profile, model, cluster, workload, bound, CostModel(profile, model, stats),
                   CostModel(profile, model, stats, per_unit=True), memory * memory_fraction,
                   latency_len, latency_len - shift, phases,
                   float(np.dot(k, p)), PhaseLengths(k, p, phases))

    def with_devices(self, count: int) -> Problem:
        """The same problem on ``count`` of the cluster's devices (sharing its ``memo``)."""
        sub = dataclasses.replace(self, cluster=Cluster(self.cluster.device, count))
        object.__setattr__(sub, "memo", self.memo)
        return sub

    # Every plan of a problem runs on all its cluster's devices: the factors measured at that many ranks.
    @functools.cached_property
    def slowdown(self) -> float:
        """``Profile.slowdown`` at the cluster's device count: the computed terms of a group of stages that spans
        several ranks (``_group_cost``)."""
        return self.profile.slowdown(self.cluster.count)

    @functools.cached_property
    def concurrency(self) -> float:
        """``Profile.concurrency`` at the cluster's device count: a one-rank WAA group computing while the other
        group computes too (``concurrent_times``)."""
        return self.profile.concurrency(self.cluster.count)

    @property
    def stats(self) -> WorkloadStats:
        return self.cost.stats

    @functools.cached_property
    def query_rows(self) -> QueryRows:
        """The rows the bound-length query decodes beside in RRA, per N_D (``exegpt.phases``; built on first use)."""
        return QueryRows(self.stats.k_lengths, self.stats.k_probs, self.phases, self.k_q)

    @property
    def max_decode_iters(self) -> int:
        return len(self.phases) - 1

    def max_batch(self, kernel: Kernel) -> float:
        return self.profile.max_coord(kernel, 1, 0)

    def tp_problem(self, t: int) -> str | None:
        """Why TP degree ``t`` cannot run this model on this profile (one line), or None."""
        if not (self.model.valid_tp(t) or self.model.valid_split(t) and self.profile.supports_tp(t)):
            # an uneven split (whole GQA groups, the first ranks one more) runs where the profile timed its shard
            uneven = ""
            if self.model.valid_split(t):
                uneven = f", or the profile must time that uneven split (whole GQA groups a rank); profile " \
                         f"{self.profile.id} has TP degrees {self.profile.tp_degrees()}"
            return f"TP degree {t} must divide {self.model.name}'s {self.model.n_heads} heads and " \
                   f"{self.model.n_kv_heads} KV heads{uneven}"
        if not self.profile.supports_tp(t):
            return f"profile {self.profile.id} has no tables at TP degree {t}; it has {self.profile.tp_degrees()}"
        return None


def offered_cluster(devices=None, profile: Profile | None = None) -> Cluster:
    """The devices a plan may use: ``devices`` ("COUNTxNAME"), by default the paper's 4xA40, or one of the
    profile's device when a profile is given; a profiled device (e.g. ``cpu``) is known by its profile."""
    known = {}
    if profile is not None and profile.device_memory_bytes is not None:
        known[profile.device] = DeviceSpec(profile.device, profile.device_memory_bytes, 1.0, 1.0, 1.0, 1.0)
    if devices is None:
        devices = DEFAULT_DEVICES if profile is None else f"1x{profile.device}"
    return parse_cluster(devices, known)


def problem(dist: Workload, slo, *, model=None, devices=None, profile: Profile | None = None,
            memory_fraction: float = MEMORY_FRACTION) -> Problem:
    """Resolve names into a Problem. Defaults: the paper's OPT-13B on 4xA40 with the built-in
    profile; with a ``profile`` given, its model on one of its devices."""
    if not isinstance(dist, Workload):
        raise ExeGPTError(f"dist must be a Workload (Workload.task, .from_trace, .truncated_normal), "
                          f"got {type(dist).__name__}")
    bound = as_bound(slo)
    if profile is not None and not isinstance(profile, Profile):
        raise ExeGPTError(f"profile must be an exegpt.Profile (Profile.load(path)), got {type(profile).__name__}")
    shape = get_model(model if model is not None else (profile.model if profile else DEFAULT_MODEL))
    cluster = offered_cluster(devices, profile)
    if profile is None:
        from .gpu_data import builtin_profile
        profile = builtin_profile(shape, cluster.device.name)
    elif profile.model.lower() != shape.name:
        raise ExeGPTError(f"profile {profile.id} was measured for {profile.model!r}, not for model {shape.name!r}")
    return Problem.build(dist, bound, profile, shape, cluster, memory_fraction)
