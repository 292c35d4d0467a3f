"""Profile: measured (or modelled) kernel times of one model on one device type.

ExeGPT's profiler split (paper §3): the attention kernel separately from the rest of the layer,
for encode (prefill) and decode, per tensor-parallel degree, plus the synchronisation costs.
All times are **seconds for one layer on one rank** of a TP group of degree ``tp``.

Kernels and their axes:

=============  ======================  ==============================================================
kernel         axes                    meaning
=============  ======================  ==============================================================
attn_encode    batch, seq              self-attention of ``batch`` prompts of ``seq`` tokens each
attn_decode    batch, context          one decode step of ``batch`` rows attending to ``context`` tokens
attn_cross     batch, context          T5 decoder cross-attention, one step, ``context`` input tokens
dense_encode   tokens                  the rest of an encoder / prefill layer for ``tokens`` tokens
dense_decode   tokens                  the rest of a decoder layer for ``tokens`` rows (one token each)
lm_head        tokens                  embedding + final norm + LM head + sampling, whole model, tp=1
allreduce      bytes                   all-reduce of ``bytes`` in a group of ``tp`` ranks
alltoall       bytes                   all-to-all in a group of ``tp`` ranks, ``bytes`` sent by each rank in all
allgather      bytes                   all-gather in a group of ``tp`` ranks, ``bytes`` contributed by each rank
send_recv      bytes                   point-to-point hand-off of ``bytes`` between pipeline stages
kv_handoff     bytes                   WAA KV-cache copy encode group -> host -> decode group
engine_encode  rows                    the executor's own work around a prefill of ``rows`` prompts
engine_decode  rows                    the executor's own work around a decode step of ``rows`` rows
=============  ======================  ==============================================================

Lookups interpolate linearly (scipy) over the **monotone envelope** of each table: the running
maximum along every axis, so more work is never credited as faster than less work (measurement
noise otherwise breaks the monotonicity the search relies on; the envelope only ever raises a
time). The search's box bounds additionally use the **batching envelope** (``per_unit=True``): the
monotone envelope with the time *per unit* of the first axis (batch, tokens or bytes) made
non-increasing, a lower bound on the time that holds the property "batching never makes a row
slower"; it is never used for an estimate. Piecewise-linear interpolation keeps both properties
between grid points. Outside the measured
range a lookup raises ``ProfileRangeError`` unless the table says ``extrapolate: true``, in which
case it extends the last segment linearly. Below the smallest measured size a lookup uses the
smallest size (a fractional micro-batch of 0.5 rows costs what 1 row costs: an upper bound).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import itertools
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
from scipy.interpolate import RectBivariateSpline, RegularGridInterpolator

from .errors import ExeGPTError, ProfileRangeError
from .interference import PhaseInterference
from .jsonfile import JSONFile, known_fields
from .models import DTYPE_BYTES

SCHEMA = 1
PROFILE_FIELDS = ("schema", "model", "device", "dtype", "source", "step_overhead_s", "padded_batches", "padded_decode",
                  "handoff_on_compute", "device_memory_bytes", "kv_dtype", "packed_weight_dtype", "panel_weight_dtype",
                  "rank_slowdown", "rank_concurrency", "waa_period_factor", "phase_interference", "provenance",
                  "tables")
"""The fields of a profile JSON (``Profile.to_dict``); any other is refused by name."""
TABLE_FIELDS = ("kernel", "tp", "axes", "xs", "ys", "seconds", "extrapolate", "spread_s", "fitted")


class Kernel(str, Enum):
    ATTN_ENCODE = "attn_encode"
    ATTN_DECODE = "attn_decode"
    ATTN_CROSS = "attn_cross"
    DENSE_ENCODE = "dense_encode"
    DENSE_DECODE = "dense_decode"
    LM_HEAD = "lm_head"
    ALLREDUCE = "allreduce"
    ALLTOALL = "alltoall"
    ALLGATHER = "allgather"
    SEND_RECV = "send_recv"
    KV_HANDOFF = "kv_handoff"
    ENGINE_ENCODE = "engine_encode"
    ENGINE_DECODE = "engine_decode"
    SP_ENCODE = "sp_encode"
    SP_DECODE = "sp_decode"


AXES: dict[Kernel, tuple[str, ...]] = {
    Kernel.ATTN_ENCODE: ("batch", "seq"),
    Kernel.ATTN_DECODE: ("batch", "context"),
    Kernel.ATTN_CROSS: ("batch", "context"),
    Kernel.DENSE_ENCODE: ("tokens",),
    Kernel.DENSE_DECODE: ("tokens",),
    Kernel.LM_HEAD: ("tokens",),
    Kernel.ALLREDUCE: ("bytes",),
    Kernel.ALLTOALL: ("bytes",),
    Kernel.ALLGATHER: ("bytes",),
    Kernel.SEND_RECV: ("bytes",),
    Kernel.KV_HANDOFF: ("bytes",),
    Kernel.ENGINE_ENCODE: ("rows", "prompt"),
    Kernel.ENGINE_DECODE: ("rows", "context"),
    Kernel.SP_ENCODE: ("tokens",),
    Kernel.SP_DECODE: ("batch", "context"),
}

# Kernels every usable profile must have at tp=1 (attn_cross only for encoder-decoder models).
REQUIRED = (Kernel.ATTN_ENCODE, Kernel.ATTN_DECODE, Kernel.DENSE_ENCODE, Kernel.DENSE_DECODE, Kernel.LM_HEAD)


def _kernel(k) -> Kernel:
    try:
        return Kernel(k)
    except ValueError:
        raise ExeGPTError(f"unknown kernel {k!r}; expected one of {', '.join(x.value for x in Kernel)}") from None


@dataclass(frozen=True, slots=True)
class ProfileTable:
    """One measured grid: ``seconds[i]`` (1-D) or ``seconds[i][j]`` (2-D) at ``xs[i]`` (, ``ys[j]``)."""

    kernel: Kernel
    tp: int
    """TP degree (for allreduce, alltoall, allgather: the group size; 1 for send_recv, kv_handoff, lm_head)."""
    xs: tuple[float, ...]
    ys: tuple[float, ...]
    """Second axis for 2-D kernels, empty for 1-D ones."""
    seconds: tuple
    """Median seconds: a tuple (1-D) or a tuple of tuples (2-D)."""
    extrapolate: bool = False
    """Whether lookups beyond the last grid point extend the last segment linearly."""
    spread_s: tuple | None = None
    """Optional spread (p90 - p10) with the same shape as ``seconds``."""
    fitted: tuple | None = None
    """Optional flags with the same shape as ``seconds``: True where the cell was not measured but filled from a
    least-squares fit of the measured cells (``profiler.fit``; its form and held-out error are in the profile's
    provenance under ``fits``). None: every cell measured."""

    def __post_init__(self):
        object.__setattr__(self, "kernel", _kernel(self.kernel))
        where = f"profile table {self.kernel.value} tp={self.tp}"
        if int(self.tp) != self.tp or self.tp < 1:
            raise ExeGPTError(f"{where}: tp {self.tp!r} must be an integer >= 1")
        dims = len(AXES[self.kernel])
        if (len(self.ys) > 0) != (dims == 2):
            raise ExeGPTError(f"{where}: expected {dims} axes {AXES[self.kernel]}")
        for name, axis in (("xs", self.xs), ("ys", self.ys)):
            if name == "ys" and dims == 1:
                continue
            a = np.asarray(axis, dtype=float)
            if a.size < 1 or not np.all(np.isfinite(a)) or np.any(a <= 0):
                raise ExeGPTError(f"{where}: {name} must be finite sizes > 0, got {list(axis)[:6]}")
            if np.any(np.diff(a) <= 0):
                raise ExeGPTError(f"{where}: {name} must be strictly increasing, got {list(axis)[:6]}")
        try:
            s = np.asarray(self.seconds, dtype=float)
        except (ValueError, TypeError):
            raise ExeGPTError(f"{where}: seconds is ragged or holds non-numbers") from None
        shape = (len(self.xs),) if dims == 1 else (len(self.xs), len(self.ys))
        if s.shape != shape:
            raise ExeGPTError(f"{where}: seconds has shape {s.shape}, expected {shape} (a hole in the grid?)")
        if not np.all(np.isfinite(s)) or np.any(s < 0):
            bad = s[~np.isfinite(s) | (s < 0)].ravel()[0]
            raise ExeGPTError(f"{where}: seconds holds {bad!r}; expected finite times >= 0 (a hole?)")
        if self.fitted is not None:
            f = np.asarray(self.fitted)
            if f.shape != shape or f.dtype != bool:
                raise ExeGPTError(f"{where}: fitted must be true/false flags of shape {shape}, got {f.shape}")
            object.__setattr__(self, "fitted", _tuplify(f.tolist()))

    def fitted_mask(self) -> np.ndarray | None:
        """``fitted`` as a boolean array, or None when every cell was measured."""
        return None if self.fitted is None else np.asarray(self.fitted, dtype=bool)

    def grid(self) -> tuple[np.ndarray, ...]:
        if self.ys:
            return np.asarray(self.xs, dtype=float), np.asarray(self.ys, dtype=float)
        return (np.asarray(self.xs, dtype=float),)

    def envelope(self, per_unit: bool = False) -> np.ndarray:
        """The monotone envelope (or, with ``per_unit``, the batching envelope; module docstring)."""
        s = np.asarray(self.seconds, dtype=float)
        for axis in range(s.ndim):
            s = np.maximum.accumulate(s, axis=axis)
        if not per_unit:
            return s
        x = np.asarray(self.xs, dtype=float).reshape((-1,) + (1,) * (s.ndim - 1))
        return np.minimum.accumulate(s / x, axis=0) * x

    def to_dict(self) -> dict:
        d = {"kernel": self.kernel.value, "tp": self.tp, "axes": list(AXES[self.kernel]), "xs": list(self.xs),
             "seconds": _listify(self.seconds), "extrapolate": self.extrapolate}
        if self.ys:
            d["ys"] = list(self.ys)
        if self.spread_s is not None:
            d["spread_s"] = _listify(self.spread_s)
        if self.fitted is not None:
            d["fitted"] = _boolify(self.fitted)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ProfileTable:
        known_fields(d, TABLE_FIELDS, f"profile table {d.get('kernel', '?') if isinstance(d, dict) else ''!r}")
        try:
            return cls(kernel=d["kernel"], tp=int(d["tp"]), xs=tuple(d["xs"]), ys=tuple(d.get("ys", ())),
                       seconds=_tuplify(d["seconds"]), extrapolate=bool(d.get("extrapolate", False)),
                       spread_s=_tuplify(d["spread_s"]) if d.get("spread_s") is not None else None,
                       fitted=_tuplify(d["fitted"]) if d.get("fitted") is not None else None)
        except KeyError as e:
            raise ExeGPTError(f"profile table {d.get('kernel', '?')!r} misses field {e}") from None


@dataclass(frozen=True, slots=True)
class ExtrapolatedReads:
    """Lookups of one table that did not read measured cells alone (``Profile.extrapolated_reads``)."""

    fitted: int = 0
    """Points whose interpolation weighs a cell filled from a fit."""
    beyond: int = 0
    """Points beyond the table's grid (its last segment extended linearly)."""


@dataclass(frozen=True, eq=False)
class Profile(JSONFile):
    """Kernel times of one model on one device type. Load with ``Profile.load(path)``."""

    _what = "profile"

    model: str
    device: str
    tables: tuple[ProfileTable, ...]
    dtype: str = "fp16"
    step_overhead_s: float = 0.0
    """Fixed per-iteration cost of the engine (scheduling, launches, Python) outside the kernels."""
    source: str = "measured"
    """'measured' (the profiler), 'gpu-data' (shipped measurements + roofline attention) or 'roofline'."""
    padded_batches: bool = False
    """The profiled backend pads a prefill batch to its longest prompt (the built-in runner does; varlen kernels
    such as vLLM's do not)."""
    padded_decode: bool = False
    """The profiled backend attends every row of a decode step over the step's longest context (the built-in
    runner's masked torch path, on GPUs and for T5). False: each row attends only its own prefix (the built-in
    runner's CPU decode kernels, vLLM's paged attention), so a step costs as its rows' mean context."""
    device_memory_bytes: float | None = None
    """Memory of one device, for devices that are not in ``exegpt.devices.DEVICES`` (e.g. a CPU)."""
    kv_dtype: str | None = None
    """Precision of the profiled backend's KV cache when it differs from the model's (the built-in runner keeps
    fp32 KV for half-precision models on a CPU): KV memory and hand-off bytes are counted in it."""
    handoff_on_compute: bool = False
    """The WAA KV hand-off's copies and messages run on the ranks' own compute (the built-in runner on a CPU: gloo
    through host memory, no copy engine), so the decode group pays the hand-off between decode iterations
    instead of overlapping it (measured on the CPU: 0.84 ms a merged batch of the decode driver's loop, against a
    profiled hand-off of 0.8-1.0 ms). False: copied by DMA while the devices compute (GPUs)."""
    packed_weight_dtype: str | None = None
    """Precision of the extra, prepacked copy of every Linear weight the profiled backend keeps (the built-in runner
    on a CPU: oneDNN's blocked layout, fp32 where the CPU has no bf16 instructions); None: no copy. Weight memory
    counts it."""
    panel_weight_dtype: str | None = None
    """Precision of a second extra copy of every Linear weight (the built-in runner's CPU kernels: the k-major
    panels that decode batches of 9 to 64 rows multiply by, built on first use); None: no copy. Weight memory
    counts it."""
    rank_slowdown: tuple[tuple[int, float], ...] = ()
    """``(ranks, factor)`` pairs: how much slower one rank computes while that many ranks of a run compute at once
    on the profiled host, against one rank alone (the kernel tables' condition): shared cores, caches and memory
    bandwidth, and a virtual machine's share of its host. Measured on a CPU (``profiler.collectives``); empty,
    i.e. 1, on GPUs, where every rank has its own device. Messages are profiled under load already."""
    rank_concurrency: tuple[tuple[int, float], ...] = ()
    """``(ranks, factor)`` pairs: how much slower one rank computes back to back while that many ranks compute at
    once, against alone: the part of ``rank_slowdown`` that is not the bursts' wake-up. It slows the one-rank groups
    of a WAA plan while the other group computes too (``exegpt.simulate.concurrent_times``). Measured on a CPU
    beside ``rank_slowdown``, the two-rank value then by running WAA plans (``profiler.engine.calibrate_waa``);
    empty, i.e. 1, on GPUs."""
    waa_period_factor: float = 1.0
    """How much longer a WAA plan's period runs than the simulator's ``max`` of its decode iteration (with the
    hand-off where ``handoff_on_compute``) and encode batch: the lockstep of one merged batch per decode iteration,
    credits and hand-off messages between two groups of ranks, beyond the hand-off the simulator already charges.
    Measured by running a WAA plan through the runner (``profiler.engine.calibrate_waa``; on 2 CPU cores the period
    ran 1.24-1.49x the longer part where the estimate says 1.21x, a factor of 1.05); at least 1 (a measured ratio
    below 1 is recorded as 1, the raw value kept in the provenance); 1: not measured."""
    phase_interference: PhaseInterference | None = None
    """A prefill and a decode process computing at once on one device, per thread split and batch size
    (``exegpt.interference``; ``profiler.interference``): what Splitwiser's steps are priced with. None: not
    measured."""
    provenance: dict = field(default_factory=dict)
    """Free-form facts: torch version, threads, date, GPU clocks, efficiencies assumed."""
    _lookup: dict = field(init=False, repr=False, compare=False, default_factory=dict)
    _watchers: list = field(init=False, repr=False, compare=False, default_factory=list)

    def __post_init__(self):
        if not self.tables:
            raise ExeGPTError(f"profile {self.model}@{self.device} has no tables")
        for f in ("step_overhead_s",):
            if not (np.isfinite(getattr(self, f)) and getattr(self, f) >= 0):
                raise ExeGPTError(f"{f}={getattr(self, f)!r} must be a number >= 0")
        for f in ("kv_dtype", "packed_weight_dtype", "panel_weight_dtype"):
            if getattr(self, f) is not None and getattr(self, f) not in DTYPE_BYTES:
                raise ExeGPTError(f"{f} {getattr(self, f)!r} unknown; expected one of {', '.join(DTYPE_BYTES)} or null")
        if not (isinstance(self.waa_period_factor, (int, float)) and np.isfinite(self.waa_period_factor)
                and self.waa_period_factor >= 1):
            raise ExeGPTError(f"waa_period_factor={self.waa_period_factor!r} must be a number >= 1")
        for name in ("rank_slowdown", "rank_concurrency"):
            for ranks, factor in getattr(self, name):
                if not (isinstance(ranks, int) and ranks >= 2 and np.isfinite(factor) and factor > 0):
                    raise ExeGPTError(f"{name} entry {(ranks, factor)!r} must be (ranks >= 2, factor > 0)")
        lookup = {}
        for t in self.tables:
            key = (t.kernel, t.tp)
            if key in lookup:
                raise ExeGPTError(f"profile has two tables for {t.kernel.value} tp={t.tp}")
            lookup[key] = (t, _interpolator(t, t.envelope()), _interpolator(t, t.envelope(per_unit=True)))
        for k in REQUIRED:
            if (k, 1) not in lookup:
                raise ExeGPTError(f"profile {self.model}@{self.device} misses the {k.value} table at tp=1")
        object.__setattr__(self, "_lookup", lookup)

    @property
    def id(self) -> str:
        return f"{self.model}@{self.device}"

    @property
    def partial(self) -> bool:
        """Whether the profiler was interrupted before it finished (``provenance["partial"]``): the tables it had
        not measured are filled from fits of what it had."""
        return bool(self.provenance.get("partial", False))

    def fit_error(self, kernel: Kernel, tp: int = 1) -> float | None:
        """The held-out relative error of the fit that filled ``kernel``'s unmeasured cells at ``tp``
        (``provenance["fits"]``), or None when none was recorded."""
        fit = self.provenance.get("fits", {}).get(f"{_kernel(kernel).value} tp={tp}", {})
        err = fit.get("held_out_error")
        return None if err is None else float(err)

    @contextlib.contextmanager
    def extrapolated_reads(self):
        """While open, count the lookups that read a cell filled by a fit (``ProfileTable.fitted``) or lie beyond
        a table's measured grid: yields a dict ``(kernel, tp) -> ExtrapolatedReads`` that fills as lookups run."""
        seen: dict = {}
        self._watchers.append(seen)
        try:
            yield seen
        finally:
            self._watchers.remove(seen)

    def _note_reads(self, table: ProfileTable, pts: list[np.ndarray], ok: np.ndarray) -> None:
        """Adds the in-range points of one lookup that read fitted cells or lie beyond the grid to every open
        ``extrapolated_reads``."""
        grids = table.grid()
        beyond = np.zeros(ok.shape, dtype=bool)
        for p, grid in zip(pts, grids):
            beyond |= p > grid[-1]
        fitted = np.zeros(ok.shape, dtype=bool)
        mask = table.fitted_mask()
        if mask is not None and mask.any():
            nodes = []  # per axis, the grid nodes a piecewise-linear lookup weighs (one on a node, else two)
            for p, grid in zip(pts, grids):
                q = np.clip(p, grid[0], grid[-1])
                lo = np.clip(np.searchsorted(grid, q, side="right") - 1, 0, len(grid) - 1)
                nodes.append((lo, np.minimum(lo + (q > grid[lo]), len(grid) - 1)))
            for corner in itertools.product(*nodes):
                fitted |= mask[corner]
        n_fitted, n_beyond = int((fitted & ok).sum()), int((beyond & ok & ~fitted).sum())
        if n_fitted or n_beyond:
            key = (table.kernel, table.tp)
            for seen in self._watchers:
                r = seen.get(key, ExtrapolatedReads())
                seen[key] = ExtrapolatedReads(r.fitted + n_fitted, r.beyond + n_beyond)

    def slowdown(self, ranks: int) -> float:
        """``rank_slowdown`` at ``ranks`` ranks computing at once: the entry of the most ranks measured up to
        ``ranks`` (1 for one rank, or none measured)."""
        return _at_most(self.rank_slowdown, ranks)

    def concurrency(self, ranks: int) -> float:
        """``rank_concurrency`` at ``ranks`` ranks, looked up as ``slowdown``."""
        return _at_most(self.rank_concurrency, ranks)

    def tp_degrees(self, kernel: Kernel = Kernel.DENSE_DECODE) -> tuple[int, ...]:
        return tuple(sorted(tp for (k, tp) in self._lookup if k == kernel))

    def has(self, kernel: Kernel, tp: int = 1) -> bool:
        return (_kernel(kernel), tp) in self._lookup

    def table(self, kernel: Kernel, tp: int = 1) -> ProfileTable:
        """The measured table of ``kernel`` at ``tp`` (``has`` says whether there is one)."""
        return self._lookup[(_kernel(kernel), tp)][0]

    def supports_tp(self, tp: int) -> bool:
        """Whether every per-layer kernel (and the all-reduce, for tp > 1) was profiled at ``tp``."""
        need = [Kernel.ATTN_ENCODE, Kernel.ATTN_DECODE, Kernel.DENSE_ENCODE, Kernel.DENSE_DECODE]
        if tp > 1:
            need.append(Kernel.ALLREDUCE)
        return all((k, tp) in self._lookup for k in need)

    def seconds(self, kernel: Kernel | str, tp: int, x, y=None):
        """Interpolated seconds at ``x`` (and ``y`` for 2-D kernels); scalars or numpy arrays."""
        kernel = _kernel(kernel)
        entry = self._lookup.get((kernel, tp))
        if entry is None:
            raise ExeGPTError(f"profile {self.id} has no {kernel.value} table at tp={tp}; "
                              f"it has tp {self.tp_degrees(kernel)}")
        table = entry[0]
        xs = np.asarray(x, dtype=float)
        pts = [xs] if y is None else [xs, np.asarray(y, dtype=float)]
        if len(pts) != len(AXES[kernel]):
            raise ExeGPTError(f"{kernel.value} takes axes {AXES[kernel]}, got {len(pts)} coordinates")
        pts = np.broadcast_arrays(*pts)
        for axis, (p, grid) in enumerate(zip(pts, table.grid())):
            lo, hi = grid[0], grid[-1]
            if np.any(p < 0) or (not table.extrapolate and np.any(p > hi)):
                bad = p[(p < 0) | ((p > hi) & (not table.extrapolate))].ravel()[0]
                raise ProfileRangeError(
                    f"{kernel.value} tp={tp}: {AXES[kernel][axis]}={bad:g} is outside the profiled range "
                    f"[{lo:g}, {hi:g}] of {self.id} (re-profile with a larger grid)")
        out, _ = self.lookup(kernel, tp, *pts)
        return float(out) if out.ndim == 0 else out

    def lookup(self, kernel: Kernel, tp: int, x, y=None, per_unit: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Vectorised lookup that never raises on range: (seconds, in_range). Out-of-range points are
        evaluated at the nearest measured coordinate and flagged False; callers must treat them as
        unusable (the search counts them infeasible), never as estimates."""
        table, monotone, batching = self._lookup[(kernel, tp)]
        interp = batching if per_unit else monotone
        pts = [np.asarray(x, dtype=float)] + ([] if y is None else [np.asarray(y, dtype=float)])
        pts = np.broadcast_arrays(*pts)
        ok = np.ones(pts[0].shape, dtype=bool)
        clipped = []
        for p, grid in zip(pts, table.grid()):
            hi = np.inf if table.extrapolate else grid[-1]
            ok &= p <= hi
            clipped.append(np.clip(p, grid[0], hi))
        if self._watchers:
            self._note_reads(table, pts, ok)
        out = interp(*(c.ravel() for c in clipped)).reshape(pts[0].shape)
        return np.maximum(out, 0.0), ok

    def max_coord(self, kernel: Kernel, tp: int = 1, axis: int = 0) -> float:
        """The largest measured coordinate (``inf`` when the table extrapolates)."""
        table = self._lookup[(_kernel(kernel), tp)][0]
        return float("inf") if table.extrapolate else table.grid()[axis][-1]

    # --- JSON ---------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "model": self.model, "device": self.device, "dtype": self.dtype,
                "source": self.source, "step_overhead_s": self.step_overhead_s,
                "padded_batches": self.padded_batches, "padded_decode": self.padded_decode,
                "handoff_on_compute": self.handoff_on_compute,
                "device_memory_bytes": self.device_memory_bytes, "kv_dtype": self.kv_dtype,
                "packed_weight_dtype": self.packed_weight_dtype,
                "panel_weight_dtype": self.panel_weight_dtype,
                "rank_slowdown": {str(r): f for r, f in self.rank_slowdown},
                "rank_concurrency": {str(r): f for r, f in self.rank_concurrency},
                "waa_period_factor": self.waa_period_factor, "provenance": self.provenance,
                **({} if self.phase_interference is None else
                   {"phase_interference": self.phase_interference.to_dict()}),
                "tables": [t.to_dict() for t in self.tables]}

    @classmethod
    def from_dict(cls, d: dict) -> Profile:
        if not isinstance(d, dict):
            raise ExeGPTError(f"a profile must be a JSON object, got {type(d).__name__}")
        known_fields(d, PROFILE_FIELDS, "profile JSON")
        if d.get("schema") != SCHEMA:
            raise ExeGPTError(f"profile schema {d.get('schema')!r} is not supported; expected {SCHEMA}")
        try:
            return cls(model=d["model"], device=d["device"], dtype=d.get("dtype", "fp16"),
                       tables=tuple(ProfileTable.from_dict(t) for t in d["tables"]),
                       step_overhead_s=float(d.get("step_overhead_s", 0.0)), source=d.get("source", "measured"),
                       padded_batches=bool(d.get("padded_batches", False)),
                       # files older than the field: both phases padded alike
                       padded_decode=bool(d.get("padded_decode", d.get("padded_batches", False))),
                       handoff_on_compute=bool(d.get("handoff_on_compute", False)),
                       device_memory_bytes=d.get("device_memory_bytes"), kv_dtype=d.get("kv_dtype"),
                       packed_weight_dtype=d.get("packed_weight_dtype"),
                       panel_weight_dtype=d.get("panel_weight_dtype"),
                       rank_slowdown=_slowdown_pairs(d.get("rank_slowdown", {}), "rank_slowdown"),
                       rank_concurrency=_slowdown_pairs(d.get("rank_concurrency", {}), "rank_concurrency"),
                       waa_period_factor=d.get("waa_period_factor", 1.0),
                       phase_interference=None if d.get("phase_interference") is None else
                       PhaseInterference.from_dict(d["phase_interference"]),
                       provenance=d.get("provenance", {}))
        except KeyError as e:
            raise ExeGPTError(f"profile misses field {e}") from None


def _at_most(pairs: tuple[tuple[int, float], ...], ranks: int) -> float:
    """The factor of the most ranks measured up to ``ranks`` (1 for one rank, or none measured)."""
    below = [(r, f) for r, f in pairs if r <= ranks]
    return max(below)[1] if below else 1.0


def _slowdown_pairs(d, name: str) -> tuple[tuple[int, float], ...]:
    """``{"2": 1.3}`` -> ``((2, 1.3),)``, sorted."""
    if not isinstance(d, dict):
        raise ExeGPTError(f"{name} must be an object of ranks -> factor, got {d!r}")
    try:
        return tuple(sorted((int(r), float(f)) for r, f in d.items()))
    except (TypeError, ValueError):
        raise ExeGPTError(f"{name} {d!r} must map a rank count to a number") from None


def _interpolator(t: ProfileTable, env: np.ndarray):
    """A piecewise-linear interpolant of ``env`` on the table's grid, f(x[, y]) on flat arrays."""
    grid = t.grid()
    if len(grid) == 1:
        xs = grid[0]
        slope = (env[-1] - env[-2]) / (xs[-1] - xs[-2]) if len(xs) > 1 else 0.0

        def f1(x):  # np.interp, plus the last segment extended beyond the grid (extrapolating tables)
            return np.interp(x, xs, env) + np.maximum(x - xs[-1], 0.0) * slope
        return f1
    if not t.extrapolate and len(grid[0]) > 1 and len(grid[1]) > 1:
        spline = RectBivariateSpline(grid[0], grid[1], env, kx=1, ky=1, s=0)  # exact bilinear, fast
        return lambda x, y: spline(x, y, grid=False)
    rgi = RegularGridInterpolator(grid, env, method="linear", bounds_error=False, fill_value=None)
    return lambda x, y: rgi(np.stack([x, y], axis=-1))


def today() -> str:
    return _dt.date.today().isoformat()


def _listify(x):
    return [_listify(v) for v in x] if isinstance(x, (tuple, list, np.ndarray)) else float(x)


def _boolify(x):
    return [_boolify(v) for v in x] if isinstance(x, (tuple, list)) else bool(x)


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x
