"""The built-in PyTorch backend: decoder-only models, KV cache, tensor parallelism, and the plan executors.

``run_plan(plan, model)`` executes an ``exegpt.Plan`` and returns a ``RunReport``; ``executor_for(policy)``
gives the rank function of a policy. Names are imported lazily so that ``import runner.model`` stays light.
"""

from __future__ import annotations

_LAZY = {
    "run_plan": "runner.run", "executor_for": "runner.run", "remap_stages": "runner.run",
    "RunReport": "runner.report", "RequestRecord": "runner.report",
    "Request": "runner.requests", "make_requests": "runner.requests", "requests_from_pairs": "runner.requests",
    "RankFailedError": "runner.dist",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'runner' has no attribute {name!r}")
