"""Data-parallel replicas: a plan whose schedule has ``replicas`` > 1 runs that many copies of its stages, each
on its own devices and its own requests, with no traffic between them. Both engines route the requests the same
way (round robin in arrival order) and run the policy's driver once per replica."""

from __future__ import annotations

from .policies.base import DriverStats


def replicas_of(plan) -> int:
    """Copies of the plan's stages (1 for every policy without a ``replicas`` knob)."""
    return int(getattr(plan.schedule, "replicas", 1))


def route(runnable, replicas: int) -> list[list[int]]:
    """The requests each replica serves: ``runnable`` (in arrival order) dealt round robin."""
    runnable = [int(r) for r in runnable]
    return [runnable[j::replicas] for j in range(replicas)]


def merge_stats(stats: list[DriverStats | None]) -> DriverStats | None:
    """One ``DriverStats`` of the replicas' (their phases and iterations concatenated, replica 0 first; the steady
    window is replica 0's, whose phases come first, and the report counts every replica's completions in it)."""
    got = [s for s in stats if s is not None]
    if not got:
        return None
    return DriverStats(tuple(x for s in got for x in s.encode_s), tuple(x for s in got for x in s.decode),
                       got[0].steady)
