"""Schedules: the free variables of one execution plan, per policy (a tagged union).

Derived values (the decoder batch B_D, the GPU split of WAA, the layer placement) are computed
from the workload and profile by the simulator and recorded in the ``Plan``; a schedule stores
only what the search chooses.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .errors import ExeGPTError


class Policy(str, Enum):
    RRA = "rra"        # Round-Robin Allocation: all devices pipeline all layers, phases alternate
    WAA_C = "waa_c"    # Workload-Aware Allocation, encode/decode devices balanced by compute
    WAA_M = "waa_m"    # Workload-Aware Allocation, balanced by memory
    STATIC = "static"  # FasterTransformer-style static batching (the paper's baseline)


def policy_of(value) -> Policy:
    try:
        return Policy(value)
    except ValueError:
        raise ExeGPTError(f"unknown policy: {value!r}; expected one of {', '.join(p.value for p in Policy)}") \
            from None


def _check_tp(tp: int, tp_gpus: int, num_gpus: int, where: str):
    if tp < 1:
        raise ExeGPTError(f"{where}: tp={tp} must be >= 1")
    if tp > num_gpus:
        raise ExeGPTError(f"{where}: tp={tp} exceeds the {num_gpus} devices available")
    if tp_gpus < 0 or tp_gpus > num_gpus or (tp > 1 and tp_gpus % tp):
        raise ExeGPTError(f"{where}: tp_gpus={tp_gpus} must be a multiple of tp={tp} in [0, {num_gpus}]")


def stage_degrees(num_gpus: int, tp: int, tp_gpus: int) -> tuple[int, ...]:
    """Pipeline stages of partial TP: ``tp_gpus // tp`` stages of degree ``tp``, then single devices."""
    if tp == 1:
        return (1,) * num_gpus
    return (tp,) * (tp_gpus // tp) + (1,) * (num_gpus - tp_gpus)


@dataclass(frozen=True, slots=True)
class RRASchedule:
    """Round-Robin Allocation: encode ``encode_batch`` queries, then ``decode_iters`` decode iterations."""

    encode_batch: int
    """B_E: queries encoded per encode phase (= expected completions per decode phase)."""
    decode_iters: int
    """N_D: decode iterations between two encode phases (encoding frequency 1/N_D)."""
    tp: int
    """TP degree of the TP stages."""
    tp_gpus: int
    """Devices that use TP (a multiple of ``tp``); the other devices are single-device stages."""
    num_gpus: int
    policy: Policy = Policy.RRA

    def __post_init__(self):
        if self.encode_batch < 1:
            raise ExeGPTError(f"RRA: encode_batch={self.encode_batch} must be >= 1")
        if self.decode_iters < 1:
            raise ExeGPTError(f"RRA: decode_iters={self.decode_iters} must be >= 1")
        _check_tp(self.tp, self.tp_gpus, self.num_gpus, "RRA")
        if self.policy is not Policy.RRA:
            raise ExeGPTError(f"RRASchedule has policy {self.policy!r}")

    @property
    def stages(self) -> tuple[int, ...]:
        return stage_degrees(self.num_gpus, self.tp, self.tp_gpus)


@dataclass(frozen=True, slots=True)
class WAASchedule:
    """Workload-Aware Allocation: an encode pipeline and a decode pipeline on disjoint devices."""

    policy: Policy
    """WAA_C or WAA_M: how the split ``encode_gpus``/``decode_gpus`` was chosen."""
    encode_batch: int
    """B_E: queries per encode batch; one encode batch enters per decode iteration."""
    micro_batch: int
    """B_m: rows per decode micro-batch in the decode pipeline."""
    tp: int
    tp_gpus: int
    """Devices using TP, taken from the encode group first, then from the decode group."""
    encode_gpus: int
    decode_gpus: int

    def __post_init__(self):
        if self.policy not in (Policy.WAA_C, Policy.WAA_M):
            raise ExeGPTError(f"WAASchedule needs policy waa_c or waa_m, got {self.policy!r}")
        if self.encode_batch < 1:
            raise ExeGPTError(f"WAA: encode_batch={self.encode_batch} must be >= 1")
        if self.micro_batch < 1:
            raise ExeGPTError(f"WAA: micro_batch={self.micro_batch} must be >= 1")
        if self.encode_gpus < 1 or self.decode_gpus < 1:
            raise ExeGPTError(f"WAA needs >= 1 encode and >= 1 decode device, got "
                              f"{self.encode_gpus}+{self.decode_gpus}")
        _check_tp(self.tp, self.tp_gpus, self.num_gpus, "WAA")
        if self.tp > 1 and (self.encode_tp_gpus % self.tp or self.decode_tp_gpus % self.tp):
            raise ExeGPTError(f"WAA: tp_gpus={self.tp_gpus} splits a TP group of {self.tp} across the "
                              f"{self.encode_gpus}-device encode group and the decode group")

    @property
    def num_gpus(self) -> int:
        return self.encode_gpus + self.decode_gpus

    @property
    def encode_tp_gpus(self) -> int:
        return min(self.tp_gpus, self.encode_gpus)

    @property
    def decode_tp_gpus(self) -> int:
        return self.tp_gpus - self.encode_tp_gpus

    @property
    def encode_stages(self) -> tuple[int, ...]:
        return stage_degrees(self.encode_gpus, self.tp, self.encode_tp_gpus)

    @property
    def decode_stages(self) -> tuple[int, ...]:
        return stage_degrees(self.decode_gpus, self.tp, self.decode_tp_gpus)


@dataclass(frozen=True, slots=True)
class StaticSchedule:
    """FasterTransformer-style static batching: a batch is encoded, then decoded until its longest
    query finishes; no early termination, no refill. TP within a node, pipeline across nodes."""

    batch: int
    tp: int
    num_gpus: int
    policy: Policy = Policy.STATIC

    def __post_init__(self):
        if self.batch < 1:
            raise ExeGPTError(f"static: batch={self.batch} must be >= 1")
        _check_tp(self.tp, self.num_gpus if self.tp > 1 else 0, self.num_gpus, "static")
        if self.num_gpus % self.tp:
            raise ExeGPTError(f"static: tp={self.tp} must divide num_gpus={self.num_gpus}")

    @property
    def stages(self) -> tuple[int, ...]:
        return (self.tp,) * (self.num_gpus // self.tp)


Schedule = RRASchedule | WAASchedule | StaticSchedule


def describe(s: Schedule) -> str:
    """One line for tables: ``RRA B_E=8 N_D=4 TP2x4``, ``WAA-C B_E=2 B_m=16 TP1x0 1+1``, ``static B=16 TP4``
    (``TP{degree}x{devices using it}``; WAA ends with its encode+decode device split)."""
    if isinstance(s, RRASchedule):
        return f"RRA B_E={s.encode_batch} N_D={s.decode_iters} TP{s.tp}x{s.tp_gpus}"
    if isinstance(s, WAASchedule):
        return (f"{s.policy.value.upper().replace('_', '-')} B_E={s.encode_batch} B_m={s.micro_batch} "
                f"TP{s.tp}x{s.tp_gpus} {s.encode_gpus}+{s.decode_gpus}")
    return f"static B={s.batch} TP{s.tp}"


def schedule_to_dict(s: Schedule) -> dict:
    d = {f: getattr(s, f) for f in s.__dataclass_fields__}
    d["policy"] = s.policy.value
    return d


def schedule_from_dict(d: dict) -> Schedule:
    d = dict(d)
    policy = policy_of(d.get("policy"))
    d["policy"] = policy
    cls = {Policy.RRA: RRASchedule, Policy.STATIC: StaticSchedule}.get(policy, WAASchedule)
    try:
        return cls(**d)
    except TypeError as e:
        raise ExeGPTError(f"{policy.value} schedule fields are wrong: {e}") from None
