"""Phase 2 of a sweep: the per-layer kernel tables and the LM head, measured within the kernel phase's time.

``KernelPhase`` holds what was measured so far, so that an interrupted sweep still builds its tables (the
measured cells, the rest fitted). Its steps:

1. ``probe``: two points of each kernel at tp=1 (the cheapest and one of moderate work), timed briefly, so that
   the cost model prices every candidate point from this machine's speed;
2. ``plan``: the points each table measures (``profiler.budget.select_points``), said up front;
3. ``measure``: table after table, the remaining tables re-planned from what was measured before each one.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from exegpt.profile import Kernel, ProfileTable
from exegpt.models import even_shares, kv_shares

from . import layer as L
from .budget import MIN_POINTS, Candidates, Clock, CostModel, TablePlan, format_duration, minimum_s, select_points
from .tables import DENSE_CACHE_LEN, TableRun, candidates, measure, measure_table, region_of

TABLE_ORDER = (Kernel.DENSE_DECODE, Kernel.DENSE_ENCODE, Kernel.ATTN_DECODE, Kernel.ATTN_ENCODE)
"""Per TP degree, cheapest kinds first (the dense tables price the machine for the attention ones); the LM head
after tp=1's dense tables."""
PROBE_REPEAT = 3
PROBE_WORK = {"cpu": 2e8, "cuda": 2e11}
"""FLOPs of the probe's second point of each kernel (tens of milliseconds on a CPU core)."""


def shard_args(args, tp: int):
    """Rank 0's per-rank args at TP degree ``tp`` (local heads and FFN), as ``runner.tp.apply_tp`` leaves them:
    the most loaded rank where ``tp`` does not divide the KV heads (it sets a step's pace)."""
    kv, ffn = kv_shares(args.n_kv_heads, tp)[0], even_shares(args.ffn_dim, tp)[0]
    return dataclasses.replace(args, n_heads=kv * (args.n_heads // args.n_kv_heads), n_kv_heads=kv, ffn_dim=ffn)


def all_points(c: Candidates, flops_cap: float | None) -> TablePlan:
    """Every point of ``c``, but attention points above ``flops_cap`` FLOPs (at least ``MIN_POINTS`` kept)."""
    order = sorted(range(len(c.index)), key=lambda i: c.work[i])
    keep = [i for n, i in enumerate(order) if flops_cap is None or n < MIN_POINTS
            or not c.kernel.startswith("attn") or c.work[i] <= flops_cap]
    return TablePlan(candidates=c, measure=tuple(c.index[i] for i in keep), estimate_s=0.0)


@dataclass
class KernelPhase:
    """The kernel tables of one sweep, as far as they were measured."""

    target: object
    """The sweep's ``profiler.sweep.Target``."""
    repeat: int
    cost: CostModel
    candidates: list[Candidates] = field(default_factory=list)
    plans: list[TablePlan] = field(default_factory=list)
    runs: list[TableRun] = field(default_factory=list)
    shard: L.LayerShard | None = None
    """The layer shard being timed (kept from the probe for tp=1's tables)."""
    head: object = None
    """The LM head (kept from the probe for its table and the step overhead)."""
    load_s: float = 0.0
    """Seconds building the probe's layer shard and head took: about what loading the whole model for a run of
    the executor costs beyond its requests (the weights' file is read and parsed each time)."""
    padded_decode: bool = True
    """Whether the shard's decode attention attends every row over the step's longest context
    (``profiler.layer.own_prefix_decode`` false), found on the first shard built."""

    def __post_init__(self):
        t = self.target
        elem = t.torch_dtype.itemsize
        from runner.model import cache_dtype

        kv = cache_dtype(t.torch_dtype, t.device).itemsize
        g = t.grid
        axes = {Kernel.DENSE_DECODE: (g.tokens,), Kernel.DENSE_ENCODE: (g.tokens,),
                Kernel.ATTN_DECODE: (g.batches, g.contexts), Kernel.ATTN_ENCODE: (g.batches, g.seqs)}
        for tp in t.tp_degrees:
            a = shard_args(t.args, tp)
            self.candidates += [candidates(k, tp, axes[k], a, elem, kv) for k in TABLE_ORDER]
        # Every table a usable profile needs at tp=1 before the rest (a partial profile must have them).
        head = candidates(Kernel.LM_HEAD, 1, (g.batches,), t.args, elem, kv, t.args.vocab_size)
        self.candidates.insert(2, head)

    def probe(self) -> None:
        """Times two points of each kernel at tp=1 briefly (``PROBE_REPEAT`` calls) into the cost model: the
        cheapest (its per-call overhead) and the one nearest ``PROBE_WORK`` FLOPs (its rate)."""
        t = self.target
        t0 = time.perf_counter()
        shard = self.shard = self._build_shard(1)
        head = self.head = L.build_head(t.spec, dtype=t.torch_dtype, device=t.device)
        self.load_s = time.perf_counter() - t0
        for c in self.candidates:
            if c.tp != 1:
                continue
            order = sorted(range(len(c.index)), key=lambda i: c.work[i])
            kernel = Kernel(c.kernel)
            region = region_of(shard, kernel, head)
            rate_point = min(order, key=lambda i: abs(math.log(max(c.work[i], 1.0) / PROBE_WORK[shard.device.type])))
            for i in dict.fromkeys((order[0], rate_point)):
                coords = tuple(c.axes[k][j] for k, j in enumerate(c.index[i]))
                _dense_cache(shard, self.target, kernel)
                s = measure(*region(*coords), PROBE_REPEAT, shard.device)
                self.cost.observe(c.kernel, c.work[i], s.median_s)

    def plan(self, allot_s: float, flops_cap: float | None) -> None:
        """Chooses every table's points: within ``allot_s`` seconds (budgeted; ``math.inf``: every point but
        attention above ``flops_cap``)."""
        if math.isinf(allot_s):
            self.plans = [all_points(c, flops_cap) for c in self.candidates]
        else:
            self.plans = select_points(self.candidates, self.cost, allot_s)

    def minimum_s(self) -> float:
        """Seconds of the points every table measures whatever the budget."""
        return minimum_s(self.plans, self.cost)

    def describe(self) -> list[str]:
        return [p.describe() for p in self.plans]

    @property
    def num_points(self) -> int:
        return sum(len(p.measure) for p in self.plans)

    def measure(self, clock: Clock, deadline_s: float, on_point: Callable[[str], None]) -> None:
        """Measures table after table until ``deadline_s`` on ``clock`` (the rest of a table past it is fitted),
        re-planning the remaining tables before each one (budgeted)."""
        t = self.target
        for i, c in enumerate(self.candidates):
            if not math.isinf(deadline_s) and i > 0:
                self.plans[i:] = select_points(self.candidates[i:], self.cost, max(0.0, deadline_s - clock.spent_s()))
            kernel = Kernel(c.kernel)
            if kernel is Kernel.LM_HEAD and self.head is None:
                self.head = L.build_head(t.spec, dtype=t.torch_dtype, device=t.device)
            elif kernel is not Kernel.LM_HEAD and (self.shard is None or self.shard.tp != c.tp):
                self.shard = None  # one shard at a time
                self.shard = self._build_shard(c.tp)
            if i == 0:
                self.padded_decode = not L.own_prefix_decode(self.shard)
            run = TableRun(self.plans[i], extrapolate_encode=t.grid.seqs[-1] >= t.max_prompt)
            self.runs.append(run)
            if kernel is not Kernel.LM_HEAD:
                _dense_cache(self.shard, t, kernel)

            def go_on() -> bool:
                on_point(c.name)
                return clock.spent_s() < deadline_s

            measure_table(run, region_of(self.shard, kernel, self.head), self.repeat, t.device, self.cost, go_on)

    def _build_shard(self, tp: int) -> L.LayerShard:
        t = self.target
        return L.build_layer_shard(t.spec, tp, dtype=t.torch_dtype, device=t.device, max_rows=2, max_len=2)

    def release(self) -> None:
        """Drops the shard and head (their memory) once the tables and the step overhead are measured."""
        self.shard = self.head = None

    def tables(self) -> tuple[list[ProfileTable], dict, dict]:
        """The tables measured so far (a started table's unmeasured cells fitted), every fit's facts by table name,
        and per table how many cells were measured and fitted."""
        tables, fits, counts = [], {}, {}
        for run in self.runs:
            if not run.stats:
                continue
            table, fit = run.table()
            tables.append(table)
            name = run.plan.candidates.name
            fitted = len(run.plan.candidates.index) - len(run.stats)
            if fit is not None:
                fits[name] = fit.to_dict() | {"fitted_cells": fitted}
            counts[name] = {"measured": len(run.stats), "fitted": fitted}
        return tables, fits, counts

    def summary(self) -> str:
        """``42 points measured, 18 fitted``."""
        measured = sum(len(r.stats) for r in self.runs)
        total = sum(len(r.plan.candidates.index) for r in self.runs)
        return f"{measured} points measured, {total - measured} fitted, est. {format_duration(self.cost_s())}"

    def cost_s(self) -> float:
        return sum(p.estimate_s for p in self.plans)


def _dense_cache(shard: L.LayerShard, t, kernel: Kernel) -> None:
    """The shard's cache while a dense table is timed: the grid's rows (the fused decode layer writes to them) and
    ``DENSE_CACHE_LEN`` positions."""
    if kernel in (Kernel.DENSE_ENCODE, Kernel.DENSE_DECODE):
        rows, length = t.grid.batches[-1], min(t.grid.max_len, DENSE_CACHE_LEN)
        c = shard.cache
        if c is None or c.max_rows != rows or c.max_len != length:
            shard.model.cache = None
            shard.model.setup_cache(rows, length)
