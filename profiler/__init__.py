"""The profiler: times the runner's own layer modules per batch size, sequence length and TP degree, and the
collectives, and writes an ``exegpt.Profile`` (seconds per layer on one rank of a TP group).

    from profiler import profile_model
    profile = profile_model("tiny", tp_degrees=(1, 2), quick=True)
    profile.save("tiny-cpu.json")

CLI: ``python -m profiler --model tiny --quick --tp 1 2 -o tiny-cpu.json``.
"""

from .grid import Grid, make_grid
from .sweep import profile_model
from .timer import QUICK_REPEAT, REPEAT, WARMUP, TimingStats, time_region

__all__ = ["Grid", "QUICK_REPEAT", "REPEAT", "TimingStats", "WARMUP", "make_grid", "profile_model", "time_region"]
