"""ExeGPT: constraint-aware scheduling of LLM inference (the solver; never imports torch)."""

from .bound import LatencyBound
from .devices import DEVICES, Cluster, DeviceSpec, parse_cluster
from .distribution import Distribution
from .errors import ExeGPTError, InfeasibleBoundError, ProfileRangeError
from .models import MODELS, ModelShape, get_model
from .plan import Estimate, Plan, SearchStats, Stage
from .profile import Kernel, Profile, ProfileTable
from .schedule import Policy, RRASchedule, Schedule, StaticSchedule, WAASchedule
from .workload import Workload

__all__ = [
    "Cluster", "DEVICES", "DeviceSpec", "Distribution", "Estimate", "ExeGPTError", "InfeasibleBoundError",
    "Kernel", "LatencyBound", "MODELS", "ModelShape", "Plan", "Policy", "Profile", "ProfileRangeError",
    "ProfileTable", "RRASchedule", "Schedule", "SearchStats", "Stage", "StaticSchedule", "WAASchedule",
    "Workload", "get_model", "parse_cluster",
]
