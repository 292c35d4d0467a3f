"""Schedules: the free variables of one execution plan. Each policy module (``exegpt.policies``) defines its
schedule dataclass; this module names the built-in policies and reads and writes any schedule through the registry.

Derived values (the decoder batch B_D, the GPU split of WAA, the layer placement) are computed
from the workload and profile by the simulator and recorded in the ``Plan``; a schedule stores
only what the search chooses.
"""

from __future__ import annotations

from enum import Enum

from .errors import ExeGPTError


class Policy(str, Enum):
    RRA = "rra"        # Round-Robin Allocation: all devices pipeline all layers, phases alternate
    WAA_C = "waa_c"    # Workload-Aware Allocation, encode/decode devices balanced by compute
    WAA_M = "waa_m"    # Workload-Aware Allocation, balanced by memory
    STATIC = "static"  # FasterTransformer-style static batching (the paper's baseline)
    CB = "cb"          # continuous (iteration-level) batching with paged KV accounting, vLLM's scheduler
    CHUNKED = "chunked"  # chunked prefill (Sarathi-Serve): decodes first, then prompt chunks, in a token budget
    DISAGG = "disagg"  # prefill/decode disaggregation (DistServe, Splitwise): two pools, KV moved between them
    SHIFT = "shift"    # Shift Parallelism (Arctic Inference): each step in SP or TP by its size; DP replicas
    PIPEINFER = "pipeinfer"  # PipeInfer: one request, asynchronous pipelined speculation, early cancellation
    BLEND = "blendserve"  # BlendServe: offline pools ordered by resource use, prefix sharing kept (radix cache)


def policy_of(value) -> Policy:
    try:
        return Policy(value)
    except ValueError:
        raise ExeGPTError(f"unknown policy: {value!r}; expected one of {', '.join(p.value for p in Policy)}") \
            from None


def check_tp(tp: int, tp_gpus: int, num_gpus: int, where: str):
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


def with_tp_defaults(fields: dict, num_gpus: int) -> dict:
    """CLI schedule fields with TP 1 unless given, and every device using TP when a degree is."""
    fields.setdefault("tp", 1)
    fields.setdefault("tp_gpus", 0 if fields["tp"] == 1 else num_gpus)
    return fields


def one_pipeline_roles(schedule) -> tuple[tuple[str, int], ...]:
    """(role, TP degree) of each stage of a policy with one pipeline over every device (RRA, static, cb)."""
    return tuple(("both", t) for t in schedule.stages)


def schedule_to_dict(s) -> dict:
    d = {f: getattr(s, f) for f in s.__dataclass_fields__}
    d["policy"] = s.policy.value
    return d
