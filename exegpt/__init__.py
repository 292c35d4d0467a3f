"""ExeGPT: constraint-aware scheduling of LLM inference (the solver; never imports torch)."""

from .bound import LatencyBound
from .devices import DEVICES, Cluster, DeviceSpec, parse_cluster
from .distribution import Distribution
from .errors import ExeGPTError, InfeasibleBoundError, ProfileRangeError
from .models import MODELS, ModelShape, get_model
from .optimize import (SearchSpace, evaluate_schedule, exhaustive_schedule, find_schedule, frontier,
                       smallest_feasible_bound, static_schedule)
from .plan import Estimate, Plan, SearchStats, Stage
from .profile import Kernel, Profile, ProfileTable
from .replay import Replay, replay
from .schedule import Policy, RRASchedule, Schedule, StaticSchedule, WAASchedule
from .simulate import simulate
from .workload import Workload

__all__ = [
    "Cluster", "DEVICES", "DeviceSpec", "Distribution", "Estimate", "ExeGPTError", "InfeasibleBoundError",
    "Kernel", "LatencyBound", "MODELS", "ModelShape", "Plan", "Policy", "Profile", "ProfileRangeError",
    "ProfileTable", "Replay", "RRASchedule", "Schedule", "SearchStats", "Stage", "StaticSchedule", "WAASchedule",
    "Workload", "get_model", "parse_cluster", "SearchSpace", "evaluate_schedule", "exhaustive_schedule",
    "find_schedule", "frontier", "replay", "simulate", "smallest_feasible_bound", "static_schedule",
]
