"""The profiler's console entry points (``exegpt-profile``, ``exegpt-demo``), importable without torch: one line
where it is missing (``runner.entry``)."""

from __future__ import annotations

from runner.entry import needs_torch


def profile(argv=None) -> int:
    return needs_torch("exegpt-profile", "profiler.__main__", argv)


def demo(argv=None) -> int:
    return needs_torch("exegpt-demo", "profiler.loop", argv)
