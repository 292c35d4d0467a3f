"""The built-in PyTorch backend: decoder-only models, KV cache, tensor parallelism, and the plan executors.

``run_plan(plan, model)`` executes an ``exegpt.Plan`` (its policy's drivers, ``exegpt.policies``, on
``runner.engine``) and returns a ``RunReport``. Names are imported lazily so that ``import runner.model`` stays light.
"""

from __future__ import annotations

_LAZY = {
    "run_plan": "runner.run", "RunOptions": "runner.run", "remap_stages": "runner.run",
    "RunReport": "exegpt.report", "RequestRecord": "exegpt.report",
    "Request": "runner.requests", "make_requests": "runner.requests", "requests_from_pairs": "runner.requests",
    "RankFailedError": "runner.dist",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'runner' has no attribute {name!r}")
