"""The registry of serving policies: a policy name to the one module that holds everything about it.

A policy module holds:
  * its knobs: a frozen schedule dataclass (``from_fields``, ``parse`` for the CLI, ``describe``);
  * its layout and memory rule: ``layout(prob, schedule)``, ``stage_roles(schedule)``;
  * its analytic estimate where it has one: ``estimate_detail(prob, layout, schedule)``, and ``spaces(prob,
    policy, tp_degrees, space)``, its search spaces with their box functions (the branch and bound's fast path),
    with ``schedule_at(layout, point, num_gpus)``;
  * its driver(s): ``drivers(plan) -> {group: driver}`` (``base``), run by the simulated engine (``exegpt.sim``)
    and by the runner (``runner.engine``), and ``cache_rows(plan, group)``.
Adding a policy is one module and one line below. Nothing outside this package branches on the policy: the
estimate, the search, the plan's JSON, both engines and the CLI ask the registry.
"""

from __future__ import annotations

from types import ModuleType

from ..errors import ExeGPTError
from ..radix import PrefixCache
from ..schedule import Policy, policy_of
from . import blendserve, cb, chunked, disagg, pipeinfer, rra, shift, static, waa
from .blendserve import BlendSchedule
from .cb import CBSchedule
from .chunked import ChunkedSchedule
from .disagg import DisaggSchedule
from .pipeinfer import PipeInferSchedule
from .rra import RRASchedule
from .shift import ShiftSchedule
from .static import StaticSchedule
from .waa import WAASchedule

_MODULES = (rra, waa, static, cb, chunked, disagg, shift, pipeinfer, blendserve)
REGISTRY: dict[str, ModuleType] = {name.value: module for module in _MODULES for name in module.NAMES}

Schedule = RRASchedule | WAASchedule | StaticSchedule | CBSchedule | ChunkedSchedule | DisaggSchedule \
    | ShiftSchedule | PipeInferSchedule | BlendSchedule


def policy_module(name) -> ModuleType:
    """The module of policy ``name`` (a ``Policy`` or its string)."""
    key = name.value if isinstance(name, Policy) else name
    try:
        return REGISTRY[key]
    except (KeyError, TypeError):
        raise ExeGPTError(f"unknown policy: {name!r}; registered: {', '.join(REGISTRY)}") from None


STEADY_STOP = ("rra",)
"""The policies whose driver ends a measurement run at its steady window (``exegpt.rules.SteadyStop``)."""


def driver_groups(plan, control=None, stop=None) -> dict:
    """``{group: driver}`` of a plan's policy; ``control``: the drift re-planner its drivers consult between phases
    (``exegpt.replan.DriftControl``; the policies with a cheap move, ``retune_space``, take one); ``stop``: an
    ``exegpt.rules.SteadyStop`` (``STEADY_STOP`` policies)."""
    module = policy_module(plan.schedule.policy)
    if stop is not None:
        if plan.schedule.policy.value not in STEADY_STOP or control is not None:
            raise ExeGPTError(f"a steady stop ends runs of {', '.join(STEADY_STOP)} plans without drift re-planning; "
                              f"this plan is {plan.schedule.policy.value}")
        return module.drivers(plan, stop=stop)
    if control is None:
        return module.drivers(plan)
    if not hasattr(module, "retune_space"):
        raise ExeGPTError(f"policy {plan.schedule.policy.value} has no drift re-planning; the policies with a cheap "
                          f"move are {', '.join(p for p, m in REGISTRY.items() if hasattr(m, 'retune_space'))}")
    return module.drivers(plan, control)


def prefix_cache(plan, prompt) -> PrefixCache | None:
    """The prefix cache an engine keeps for a run of ``plan`` (None: its policy has none); ``prompt(rid)``: the
    prompt token ids of request ``rid``."""
    tokens = getattr(policy_module(plan.schedule.policy), "prefix_cache_tokens", None)
    n = tokens(plan) if tokens is not None else 0
    return PrefixCache(n, prompt) if n else None


def describe(s) -> str:
    """One line for tables: ``RRA B_E=8 N_D=4 TP2x4``, ``WAA-C B_E=2 B_m=16 TP1x0 1+1``, ``static B=16 TP4``
    (``TP{degree}x{devices using it}``; WAA ends with its encode+decode device split)."""
    return policy_module(s.policy).describe(s)


def schedule_from_dict(d: dict):
    """A schedule from its JSON fields (``schedule.schedule_to_dict``)."""
    d = dict(d)
    policy = policy_of(d.get("policy"))
    d["policy"] = policy
    try:
        return policy_module(policy).from_fields(d)
    except TypeError as e:
        raise ExeGPTError(f"{policy.value} schedule fields are wrong: {e}") from None
