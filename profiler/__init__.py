"""The profiler: times the runner's own layer modules per batch size, sequence length and TP degree, and the
collectives, and writes an ``exegpt.Profile`` (seconds per layer on one rank of a TP group).

    from profiler import profile_model
    profile = profile_model("tiny", tp_degrees=(1, 2), quick=True)
    profile.save("tiny-cpu.json")

CLI: ``python -m profiler --model tiny --quick --tp 1 2 -o tiny-cpu.json``.

Names are imported lazily, so ``python -m profiler`` can reject bad arguments before torch loads.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "profile_model": "sweep", "Grid": "grid", "make_grid": "grid", "time_region": "timer", "TimingStats": "timer",
    "WARMUP": "timer", "REPEAT": "timer", "QUICK_REPEAT": "timer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'profiler' has no attribute {name!r}")
