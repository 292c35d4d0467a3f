"""The analytic estimate of a schedule: steady-state throughput and bound-length latency, from its policy module's
box function at one point (``exegpt.policies``; the method of each policy is described there, the stage costs
they share in ``exegpt.stages``)."""

from __future__ import annotations

import math

import numpy as np

from .bound import LatencyBound
from .checks import instance
from .errors import ExeGPTError
from .memory import MEMORY_FRACTION
from .plan import Estimate
from .policies import Schedule, policy_module
from .problem import Problem, problem
from .profile import Profile
from .stages import Layout
from .workload import Workload


def layout_for(prob: Problem, s: Schedule) -> Layout:
    instance(s, Schedule, "schedule", "a policy's schedule (RRASchedule, WAASchedule, CBSchedule, ...; a Plan's is "
             "plan.schedule)")
    if s.num_gpus != prob.cluster.count:
        raise ExeGPTError(f"schedule uses {s.num_gpus} devices but the cluster has {prob.cluster.count}")
    module = policy_module(s.policy)
    if hasattr(module, "check"):  # the policy's own one-line reasons first (e.g. Shift Parallelism's degrees)
        module.check(prob, s)
    for t in sorted({t for _, t in module.stage_roles(s)}):
        if (why := prob.tp_problem(t)) is not None:
            raise ExeGPTError(why)
    lay = module.layout(prob, s)
    if lay is None:
        raise ExeGPTError(f"{prob.model.name} does not fit on {prob.cluster.label} with {s}: "
                          f"its weights exceed device memory or there are more stages than layers")
    return lay


def estimate(prob: Problem, lay: Layout, s: Schedule) -> Estimate:
    """The exact estimate of one schedule on its layout."""
    d, latency_len = policy_module(s.policy).estimate_detail(prob, lay, s)
    thr = float(np.ravel(d.thr)[0])
    return Estimate(
        throughput_seq_s=thr, throughput_tok_s=thr * prob.workload.output_len.mean(),
        latency_s=float(np.ravel(d.lat)[0]), latency_len=int(latency_len),
        encode_stage_s=float(np.ravel(d.t_enc)[0]), decode_step_s=float(np.ravel(d.t_dec)[0]),
        decode_batch=float(np.ravel(d.bd)[0]), refill_batch=float(np.ravel(d.bd if d.refill is None else d.refill)[0]),
        kv_tokens=float(np.ravel(d.kv_tokens)[0]), memory_bytes=tuple(float(np.ravel(m)[0]) for m in d.mem),
        memory_capacity_bytes=prob.capacity_bytes)


def simulate(schedule: Schedule, workload: Workload, profile: Profile | None = None, *, model="opt-13b",
             devices="4xA40", bound: LatencyBound | float = math.inf,
             memory_fraction: float = MEMORY_FRACTION) -> Estimate:
    """Estimate one schedule. ``profile`` defaults to the built-in profile of ``model`` on ``devices``."""
    prob = problem(workload, bound, model=model, devices=devices, profile=profile, memory_fraction=memory_fraction)
    return estimate(prob, layout_for(prob, schedule), schedule)
