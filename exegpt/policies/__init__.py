"""The registry of serving policies: a policy name to the one module that holds everything about it.

A policy module defines its driver(s) (``drivers(plan) -> {group: driver}``, see ``base``), the cache rows each
group needs (``cache_rows(plan, group)``), and, where it has them, its schedule type, layout and analytic estimate.
Nothing outside this package branches on the policy: the simulated engine, the runner, the optimizer and the plan's
JSON ask the registry.
"""

from __future__ import annotations

from types import ModuleType

from ..errors import ExeGPTError
from ..schedule import Policy
from . import rra, static, waa

REGISTRY: dict[str, ModuleType] = {
    Policy.RRA.value: rra,
    Policy.WAA_C.value: waa,
    Policy.WAA_M.value: waa,
    Policy.STATIC.value: static,
}


def policy_module(name) -> ModuleType:
    """The module of policy ``name`` (a ``Policy`` or its string)."""
    key = name.value if isinstance(name, Policy) else name
    try:
        return REGISTRY[key]
    except (KeyError, TypeError):
        raise ExeGPTError(f"unknown policy: {name!r}; registered: {', '.join(REGISTRY)}") from None


def driver_groups(plan) -> dict:
    """``{group: driver}`` of a plan's policy."""
    return policy_module(plan.schedule.policy).drivers(plan)
