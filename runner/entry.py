"""The runner's console entry point (``exegpt-run``), importable without torch: where torch is missing (the
solver-only install, ``pip install -e .``) it says so in one line instead of a traceback. ``profiler.entry`` does
the same for the profiler's commands with ``needs_torch``."""

from __future__ import annotations

import importlib
import importlib.util
import sys

INSTALL = "pip install torch==2.13.0 -e '.[runner]'"


def needs_torch(command: str, module: str, argv=None) -> int:
    """``module.main(argv)``, or one line and exit status 2 where torch is not installed."""
    if importlib.util.find_spec("torch") is None:
        print(f"{command}: error: needs torch, which the solver-only install leaves out; install the runner extra: "
              f"{INSTALL}", file=sys.stderr)
        return 2
    return importlib.import_module(module).main(argv)


def run(argv=None) -> int:
    return needs_torch("exegpt-run", "runner.__main__", argv)
