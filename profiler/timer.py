"""Timing one region of code: warm-up, then repeated synchronized measurements.

The model is nanoGPT's ``bench.py`` (a burn-in stage, then a measured stage) and vidur's ``WARMUP_STEPS`` /
``ACTIVE_STEPS``. On CUDA each repetition is bracketed by CUDA events and the device is synchronized before the
events are read (``Event.elapsed_time`` returns milliseconds; converted to seconds here, and only here). On CPU
``time.perf_counter`` brackets each repetition. All results are **seconds**.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from exegpt.errors import ExeGPTError

WARMUP = 3
"""Untimed calls before measuring (allocator, caches, lazy initialisation)."""
REPEAT = 20
"""Timed calls per measurement in a full sweep."""
QUICK_REPEAT = 5
"""Timed calls per measurement in a quick sweep."""


@dataclass(frozen=True, slots=True)
class TimingStats:
    """Summary of ``repeat`` timed calls of one region, in seconds."""

    median_s: float
    p10_s: float
    p90_s: float
    mean_s: float
    min_s: float
    repeat: int

    @property
    def spread_s(self) -> float:
        """p90 - p10: how noisy the measurement was."""
        return self.p90_s - self.p10_s

    @classmethod
    def from_samples(cls, samples_s: list[float] | np.ndarray) -> TimingStats:
        """Summarise raw per-call times (seconds)."""
        a = np.asarray(samples_s, dtype=float)
        if a.size == 0:
            raise ExeGPTError("no timing samples to summarise")
        p10, p50, p90 = np.percentile(a, [10, 50, 90])
        return cls(median_s=float(p50), p10_s=float(p10), p90_s=float(p90), mean_s=float(a.mean()),
                   min_s=float(a.min()), repeat=int(a.size))


def _is_cuda(device: torch.device | str | None) -> bool:
    return device is not None and torch.device(device).type == "cuda"


def time_region(fn: Callable[[], object], *, warmup: int = WARMUP, repeat: int = REPEAT,
                device: torch.device | str | None = None,
                setup: Callable[[], object] | None = None) -> TimingStats:
    """Time ``fn()`` ``repeat`` times after ``warmup`` untimed calls.

    Args:
        fn: the region to time; called with no arguments, its result is discarded.
        warmup: untimed calls first.
        repeat: timed calls.
        device: where ``fn`` runs; ``cuda`` devices are timed with CUDA events, everything else with
            ``time.perf_counter``.
        setup: called (untimed) before every call of ``fn``, e.g. to rewind a KV cache's lengths so that
            every repetition does the same work.

    Returns:
        ``TimingStats`` in seconds.
    """
    if warmup < 0 or repeat < 1:
        raise ExeGPTError(f"timing needs warmup >= 0 and repeat >= 1, got warmup={warmup}, repeat={repeat}")
    with torch.inference_mode():
        for _ in range(warmup):
            if setup is not None:
                setup()
            fn()
        if _is_cuda(device):
            return _time_cuda(fn, repeat, torch.device(device), setup)
        samples = []
        for _ in range(repeat):
            if setup is not None:
                setup()
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return TimingStats.from_samples(samples)


def _time_cuda(fn: Callable[[], object], repeat: int, device: torch.device,
               setup: Callable[[], object] | None) -> TimingStats:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
    torch.cuda.synchronize(device)
    for start, end in zip(starts, ends):
        if setup is not None:
            setup()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    # Event.elapsed_time is in milliseconds.
    return TimingStats.from_samples([s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)])


def timer_facts() -> dict:
    """What the timings depend on besides the code: threads and the timing protocol."""
    return {"torch_threads": torch.get_num_threads(), "warmup": WARMUP}


def time_interleaved(fns: list[Callable[[], object]], *, warmup: int = WARMUP, repeat: int = REPEAT,
                     device: torch.device | str | None = None, idle_s: float = 0.0) -> list[TimingStats]:
    """Time several regions round-robin (one call of each per round), so that all of them see the same
    background load; for comparisons between regions on a shared machine. CPU clock; on CUDA each call is
    synchronized. ``idle_s``: a sleep before every timed call (a burst after a blocking wait)."""
    cuda = _is_cuda(device)
    samples: list[list[float]] = [[] for _ in fns]
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in fns:
                fn()
        for _ in range(repeat):
            for i, fn in enumerate(fns):
                if idle_s:
                    time.sleep(idle_s)
                if cuda:
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                fn()
                if cuda:
                    torch.cuda.synchronize(device)
                samples[i].append(time.perf_counter() - t0)
    return [TimingStats.from_samples(s) for s in samples]
