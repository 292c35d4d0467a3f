"""Measuring one kernel table: its candidate points, the chosen ones timed cheapest first, spikes re-timed, the
rest filled from a fit (``profiler.fit``).

The work of a point (FLOPs, ``point_work``) prices it in the budget (``profiler.budget.CostModel``); its memory
(``point_memory_bytes``: KV cache and attention inputs) keeps a sweep's resident memory bounded: an attention
point's shard cache is sized for that point (``_fit_cache``), not for the whole grid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from exegpt.profile import Kernel, ProfileTable

from . import layer as L
from .budget import LONG_CALL_S, Candidates, CostModel, TablePlan
from .fit import Fit, fill_table
from .timer import WARMUP, TimingStats, time_region

NOISY_SPREAD = 0.5
"""A point whose spread (p90 - p10) exceeds this fraction of its median is timed once more."""
SPIKE = 1.3
"""A measured point more than this factor above a point with more work (larger along any axis) is noise."""
DESPIKE_PASSES = 2
LONG_WARMUP, LONG_REPEAT = 1, 3
"""Calls of a point priced above ``profiler.budget.LONG_CALL_S`` seconds (not re-timed as a spike either): its own
noise is small against its length, and each call costs a share of the budget."""
DENSE_CACHE_LEN = 512
"""Cache positions of the shard while its dense tables are timed (a long prefill's tokens are split into prompts
of at most this many: the rest of a layer depends only on the token count)."""


def measure(fn: Callable[[], object], setup: Callable[[], object] | None, repeat: int,
            device: torch.device, warmup: int = WARMUP) -> TimingStats:
    """``time_region``, retried once with twice the repeats when the first try was noisy; the try with the lower
    median is kept (background load only ever adds time, and the monotone envelope of a table would spread a
    spike to every larger size)."""
    s = time_region(fn, setup=setup, repeat=repeat, device=device, warmup=warmup)
    if s.spread_s > NOISY_SPREAD * s.median_s:
        s2 = time_region(fn, setup=setup, repeat=2 * repeat, device=device, warmup=warmup)
        s = min(s, s2, key=lambda x: x.median_s)
    return s


# --- what a point costs ---------------------------------------------------------------------------


def _dims(args) -> tuple[int, int, int]:
    """(query heads, KV heads, head dim) of per-rank ``args``."""
    return args.n_heads, args.n_kv_heads, args.head_dim


def point_work(kernel: Kernel, args, x: int, y: int = 0, vocab: int = 0) -> float:
    """FLOPs of one call at a point of ``kernel``'s table, for per-rank ``args`` (``runner.model.ModelArgs``);
    attention without a causal discount."""
    h, hkv, d = _dims(args)
    if kernel is Kernel.ATTN_ENCODE:
        return 4.0 * x * h * y * y * d
    if kernel is Kernel.ATTN_DECODE:
        return 4.0 * x * h * y * d
    if kernel is Kernel.LM_HEAD:
        return 2.0 * x * args.dim * vocab
    ffn = (3 if args.gated_ffn else 2) * args.dim * args.ffn_dim
    return 2.0 * x * (args.dim * (h + 2 * hkv) * d + h * d * args.dim + ffn)


def point_memory_bytes(kernel: Kernel, args, x: int, y: int, elem_bytes: int, kv_bytes: int) -> float:
    """Bytes one point allocates: the KV cache it needs and its attention inputs (scores included, an upper
    bound), or its activations."""
    h, hkv, d = _dims(args)
    if kernel is Kernel.ATTN_ENCODE:
        return x * y * (2 * hkv * d * kv_bytes + (h + 2 * hkv) * d * elem_bytes + h * y * 4)
    if kernel is Kernel.ATTN_DECODE:
        return x * y * 2 * hkv * d * kv_bytes
    return 4.0 * x * (args.dim + args.ffn_dim) * 3


def candidates(kernel: Kernel, tp: int, axes: tuple[tuple[int, ...], ...], args, elem_bytes: int, kv_bytes: int,
               vocab: int = 0) -> Candidates:
    """Every point of one table's grid with its work and memory."""
    index = tuple(np.ndindex(*(len(a) for a in axes)))
    coords = [tuple(a[i[k]] for k, a in enumerate(axes)) + (0,) * (2 - len(axes)) for i in index]
    return Candidates(kernel=kernel.value, tp=tp, axes=axes, index=index,
                      work=tuple(point_work(kernel, args, x, y, vocab) for x, y in coords),
                      memory_bytes=tuple(point_memory_bytes(kernel, args, x, y, elem_bytes, kv_bytes)
                                         for x, y in coords))


# --- measuring a table ----------------------------------------------------------------------------


@dataclass
class TableRun:
    """One table being measured: the statistics of its measured points so far (grid index -> stats)."""

    plan: TablePlan
    stats: dict = field(default_factory=dict)

    @property
    def kernel(self) -> Kernel:
        return Kernel(self.plan.candidates.kernel)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(median seconds, spread seconds, measured mask) over the table's grid; unmeasured cells +inf."""
        shape = tuple(len(a) for a in self.plan.candidates.axes)
        med, spread, measured = np.full(shape, np.inf), np.zeros(shape), np.zeros(shape, dtype=bool)
        for idx, s in self.stats.items():
            med[idx], spread[idx], measured[idx] = s.median_s, s.spread_s, True
        return med, spread, measured

    def table(self) -> tuple[ProfileTable, Fit | None]:
        """The ProfileTable: measured cells, the rest from the fit (flagged, their spread the held-out error)."""
        c = self.plan.candidates
        med, spread, measured = self.arrays()
        ys = c.axes[1] if len(c.axes) > 1 else ()
        filled, fit = fill_table(self.kernel, c.axes[0], ys, np.where(measured, med, 0.0), measured)
        if fit is not None and fit.held_out_error is not None:
            spread = np.where(measured, spread, filled * fit.held_out_error)
        extrapolate = self.kernel is not Kernel.ATTN_ENCODE or self.extrapolate_encode
        table = ProfileTable(kernel=self.kernel, tp=c.tp, xs=_f(c.axes[0]), ys=_f(ys), seconds=_listed(filled),
                             spread_s=_listed(spread), extrapolate=extrapolate,
                             fitted=None if measured.all() else _listed(~measured))
        return table, fit

    extrapolate_encode: bool = False
    """Whether attn_encode's table extrapolates (its seq axis reaches the model's context: only the batch axis,
    where attention is linear, can be exceeded by a valid request)."""


def _fit_cache(shard: L.LayerShard, rows: int, length: int) -> None:
    """Reallocate the shard's cache when a point does not fit it: sized for that point alone, so that the
    resident memory is the largest point's, not the grid's rows x positions."""
    c = shard.cache
    if c is None or rows > c.max_rows or length > c.max_len:
        shard.model.cache = None  # free the old cache before allocating the new one
        shard.model.setup_cache(rows, length)


def region_of(shard: L.LayerShard, kernel: Kernel, head=None) -> Callable[..., L.Region]:
    """The timeable region of ``kernel`` at a point's coordinates (the shard's cache fitted to it)."""
    if kernel is Kernel.ATTN_ENCODE:
        def enc(b, s):
            _fit_cache(shard, b, s)
            return L.attn_encode_region(shard, b, s)
        return enc
    if kernel is Kernel.ATTN_DECODE:
        def dec(b, c):
            _fit_cache(shard, b, c)
            return L.attn_decode_region(shard, b, c)
        return dec
    if kernel is Kernel.LM_HEAD:
        return lambda n: L.lm_head_region(head, n)
    if kernel is Kernel.DENSE_ENCODE:
        return lambda n: L.dense_encode_region(shard, n)
    return lambda n: L.dense_decode_region(shard, n)


def measure_table(run: TableRun, region: Callable[..., L.Region], repeat: int, device: torch.device,
                  cost: CostModel, on_point: Callable[[], bool]) -> None:
    """Times ``run.plan``'s points in order into ``run.stats``, each observed by ``cost``; ``on_point()`` after
    each says whether to go on (False: the phase's time is up, the rest of the table is fitted). Then points
    slower than a neighbour with more work are re-timed (background load; the lower median is kept)."""
    c = run.plan.candidates
    work = dict(zip(c.index, c.work))
    long = set()
    for n, idx in enumerate(run.plan.measure):
        coords = tuple(c.axes[k][i] for k, i in enumerate(idx))
        if cost.call_s(c.kernel, work[idx]) > LONG_CALL_S:
            long.add(idx)
            s = measure(*region(*coords), LONG_REPEAT, device, warmup=LONG_WARMUP)
        else:
            s = measure(*region(*coords), repeat, device)
        run.stats[idx] = s
        cost.observe(c.kernel, work[idx], s.median_s)
        if not on_point() and n + 1 >= min(len(run.plan.measure), 4):
            break
    _despike(run, region, repeat, device, long)


def _despike(run: TableRun, region, repeat: int, device: torch.device, skip: set = frozenset()) -> None:
    axes = run.plan.candidates.axes
    for _ in range(DESPIKE_PASSES):
        med, _, _ = run.arrays()
        bad = []
        for idx in run.stats:
            if idx in skip:
                continue
            for axis in range(med.ndim):
                nxt = list(idx)
                nxt[axis] += 1
                if nxt[axis] < med.shape[axis] and med[idx] > SPIKE * med[tuple(nxt)]:
                    bad.append(idx)
                    break
        if not bad:
            return
        for idx in bad:
            again = measure(*region(*(axes[k][i] for k, i in enumerate(idx))), repeat, device)
            run.stats[idx] = min(run.stats[idx], again, key=lambda x: x.median_s)


def _f(xs) -> tuple[float, ...]:
    return tuple(float(x) for x in xs)


def _listed(a: np.ndarray) -> tuple:
    """A 1-D or 2-D array as (nested) tuples of Python scalars."""
    return tuple(tuple(v.tolist()) for v in a) if a.ndim == 2 else tuple(a.tolist())
