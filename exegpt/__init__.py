"""ExeGPT: constraint-aware scheduling of LLM inference (the solver; never imports torch)."""

from .arrivals import Arrivals, request_stream
from .bound import LatencyBound
from .devices import DEVICES, Cluster, DeviceSpec, parse_cluster
from .distribution import Distribution
from .errors import ExeGPTError, InfeasibleBoundError, ProfileRangeError
from .models import MODELS, ModelShape, get_model
from .policies import RRASchedule, Schedule, StaticSchedule, WAASchedule
from .search.optimize import (SearchSpace, evaluate_schedule, exhaustive_schedule, find_schedule, frontier,
                              smallest_feasible_bound, static_schedule)
from .plan import Estimate, Plan, SearchStats
from .profile import Kernel, Profile, ProfileTable
from .replan import DriftOptions
from .report import Percentiles, RequestRecord, RunReport
from .schedule import Policy
from .sim import run_simulated
from .slo import CompletionSLO, RequestSLO
from .stages import Stage
from .simulate import simulate
from .workload import Workload

__all__ = [
    "Arrivals", "CompletionSLO", "DriftOptions", "RequestSLO", "Cluster", "DEVICES", "DeviceSpec", "Distribution", "Estimate",
    "ExeGPTError", "InfeasibleBoundError", "Kernel", "LatencyBound", "MODELS", "ModelShape", "Plan", "Policy",
    "Profile", "ProfileRangeError", "ProfileTable", "Percentiles", "RequestRecord", "RRASchedule", "RunReport",
    "Schedule", "SearchStats", "Stage", "StaticSchedule", "WAASchedule", "Workload", "get_model", "parse_cluster",
    "SearchSpace", "evaluate_schedule", "exhaustive_schedule", "find_schedule", "frontier", "request_stream",
    "run_simulated", "simulate", "smallest_feasible_bound", "static_schedule",
]
