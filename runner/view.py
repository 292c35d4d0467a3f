"""The ``View`` of ``exegpt.policies.base`` on the wall clock: what a driver reads from the runner's engines
(``runner.engine.RunnerEngine``, PipeInfer's ``runner.spec_head.Head``), and the streaming of finished requests'
records to the launcher."""

from __future__ import annotations

import time

import numpy as np


class WallClockView:
    """Reads a run's ledger on the wall clock. The engine sets ``t0_ns`` (the run's time origin), ``ledger``,
    ``prompts``, ``runnable`` (the requests it serves, in arrival order), ``arrive`` (their arrival seconds),
    ``taken`` (the first runnable request no prefill took), ``took`` (those taken out of arrival order beyond it)
    and ``num_stages``; ``stream_to`` sends finished requests' records somewhere."""

    STREAM_EVERY_S = 0.05
    """Finished requests' records go to the sink at most this often (and at the end)."""

    sink = None
    streamed_s = 0.0

    def now(self) -> float:
        return (time.perf_counter_ns() - self.t0_ns) / 1e9

    def waiting(self) -> list[int]:
        return [r for r in self.runnable[self.taken:self.arrived()] if r not in self.took]

    def arrived(self) -> int:
        return int(np.searchsorted(self.arrive, self.now(), side="right"))

    def num_runnable(self) -> int:
        return len(self.runnable)

    def more_to_come(self) -> bool:
        return self.arrived() < len(self.runnable)

    def done(self, rid: int) -> bool:
        return self.ledger.done(rid)

    def input_len(self, rid: int) -> int:
        return len(self.prompts[rid])

    def generated(self, rid: int) -> int:
        return int(self.ledger.gen[rid])

    def stream_to(self, sink) -> None:
        """From now on the records of requests as they finish go to ``sink`` (None: nowhere)."""
        self.sink = sink
        if sink is not None:
            self.ledger.finish_log = []

    def stream(self, force: bool = False) -> None:
        """The records of the requests finished since the last call, to the sink (batched in time; ``force``:
        now). A record sent survives the failure of the run (``runner.launch.publish``)."""
        if self.sink is None or not self.ledger.finish_log:
            return
        now = time.perf_counter()
        if force or now - self.streamed_s >= self.STREAM_EVERY_S:
            self.sink([self.ledger.record(i) for i in self.ledger.finish_log])
            self.ledger.finish_log.clear()
            self.streamed_s = now
