"""Progress of long runs: a tqdm bar on a terminal; off a terminal (a log file, a pipe) a plain line every
``LINE_EVERY_S`` seconds and one at the end, instead of carriage-return frames."""

from __future__ import annotations

import sys
import time

LINE_EVERY_S = 30.0


class LineProgress:
    """The subset of tqdm's interface the runner and the profiler use, written as periodic lines."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0, file=None, every_s: float = LINE_EVERY_S):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.file, self.every_s = file or sys.stderr, every_s
        self.t0 = self.last = time.monotonic()
        self.postfix = ""

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self._line(now)

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def close(self) -> None:
        self._line(time.monotonic())

    def _line(self, now: float) -> None:
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.n}/{self.total} {self.unit} in {now - self.t0:.0f} s{extra}", file=self.file,
              flush=True)


def progress_bar(total: int, desc: str, unit: str, initial: int = 0, file=None):
    """A tqdm bar on stderr when it is a terminal, else a ``LineProgress``."""
    stream = file or sys.stderr
    if not stream.isatty():
        return LineProgress(total, desc, unit, initial, stream)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True, leave=False, file=stream)
