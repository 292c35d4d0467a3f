"""The sweep: grid x kernels x TP degrees -> ``exegpt.Profile``, within a time budget.

Phases (``profile_model``):

1. **Inputs**: model arguments (``runner.weights.load_model``), device, dtype, TP degrees, budget, workload and
   grid are all checked before anything is timed, so bad input fails in seconds with one line. A budgeted sweep's
   grid is cut at what the solver can use here (``budget_grid``): batches up to the largest whose KV cache fits
   the device's memory, lengths up to the workload's longest prompt and context when one is given.
2. **Per-layer kernels, per TP degree** (``profiler.layer``, ``profiler.tables``): rank 0's shard of decoder layer
   0, timed as the attention core (``attn_encode``, ``attn_decode``) and the rest of the layer
   (``dense_encode``, ``dense_decode``), and the LM head. ``rest + attention`` is one layer forward
   (``tests/profiler`` checks it). A short probe prices every point first (``profiler.budget``), the plan says
   what it measures and what it fits, then each table's chosen points are timed cheapest first, re-planned after
   every table from what was measured, and the rest filled from fits of the known form (``profiler.fit``; each
   fit's held-out error in the provenance under ``fits``, the filled cells flagged in the table).
3. **The step overhead** at tp=1: ``step_overhead_s``, the fixed per-step cost of the runner's decode step outside
   the per-layer kernels (Step construction, mask and RoPE gathers, cache bookkeeping, sampling and the host copy
   of the tokens).
4. **Collectives** (``profiler.collectives``): all-reduce per TP degree, send_recv and kv_handoff, in spawned
   process groups, over message sizes up to what the solver sends (the dense tables' most tokens of hidden
   states); skipped, with a note, when the budget cannot hold them. With two CPU ranks, Shift Parallelism's
   base-mode layer timed whole (``profiler.sp_layer``: ``sp_encode``, ``sp_decode``).
5. **The Profile**, with provenance (model, device, dtype, torch version, threads, date, grid, budget, fits).
6. **The executor** (``profiler.engine.calibrate_engine``, ``engine=True``): RRA plans run through the runner,
   the residual over the kernel tables tabulated as ``engine_encode`` / ``engine_decode``; the runs sized to the
   budget and to a bounded KV cache.
7. **WAA's two groups** (``profiler.engine.calibrate_waa``, with the collectives, where two ranks can run): WAA
   plans run on two ranks; their groups' concurrency (``Profile.rank_concurrency`` at two ranks, in place of the
   back-to-back probe of phase 4) and lockstep (``Profile.waa_period_factor``).

Interrupted (Ctrl-C), the sweep raises ``ProfileInterrupted`` holding a partial profile: what was measured, the
rest of each started table fitted, ``provenance["partial"]`` true.

Extrapolation (``extrapolate: true``) is set only where a linear extension of the last segment is physically
right: the dense and LM-head tables (work linear in tokens / rows once the batch saturates the device), the
collectives (bandwidth-bound: linear in bytes), ``attn_decode`` (linear in rows and in context) and ``attn_encode``
when its sequence axis reaches the longest prompt a request can have (then only the batch axis, where attention
is linear, can be exceeded by a valid request).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import math
import platform
from collections.abc import Callable
from dataclasses import dataclass

import torch

from exegpt.errors import ExeGPTError
from exegpt.models import ModelShape
from exegpt.profile import REQUIRED, Kernel, Profile
from exegpt.workload import Workload
from runner import cpu_kernels
from runner.generate import decode_step as runner_decode_step
from runner.weights import load_model

from . import layer as L
from .budget import MIN_POINTS, PHASE_SHARES, Clock, CostModel, format_duration, parse_duration
from .collectives import CollectiveResult, measure_collectives
from .sp_layer import SP_LAYER_S, measure_sp_layer, points_for
from .device import describe_device
from .grid import Grid
from .kernels import KernelPhase
from .target import Target, _kv_dtype, _packed_weight_dtype, _panel_weight_dtype, resolve_target  # noqa: F401
from .timer import QUICK_REPEAT, REPEAT, WARMUP, time_interleaved

log = logging.getLogger(__name__)

METHOD_VERSION = 15
"""Bumped whenever what the profiler measures changes (2: steady-state engine calibration and
``handoff_on_compute``; 3: the CPU decode kernels of ``runner.cpu_kernels``; 4: the rest of a fused
decode layer timed as one call; 5: a fused decode core timed with every row at the context, ``padded_decode``;
6: a pipeline hop as one message into a posted receive, ``runner.pipeline.CommandInbox``; 7: fused decode layers
called with packed weights, ``runner.cpu_kernels.LayerPack``; 8: the rank concurrency, ``Profile.rank_concurrency``;
9: decode batches above 8 rows on the weights' panels, ``Profile.panel_weight_dtype``, and the token axis holding
the backend's row breaks, ``runner.cpu_kernels.row_breaks``; 10: the WAA lockstep, ``Profile.waa_period_factor``;
11: the two-rank concurrency measured by WAA runs; 12: prefill attends causally without a padding mask,
``runner.model.prefill_step``; 13: all-to-all and all-gather tables, ``runner.ulysses``; 14: points priced and
chosen within a time budget, the rest fitted, ``profiler.budget``, and the engine calibration's runs sized to it), so
cached profiles of an older method are measured again."""

CPU_ATTN_FLOPS_BUDGET = {True: 2e10, False: 2e11}
"""Without a budget: largest attention work (FLOPs) measured per point on a CPU, for quick / full grids; beyond
it the point is fitted (``profiler.fit``)."""
STEP_OVERHEAD_LAYERS = 2
"""Decoder layers of the small model whose decode step is timed for ``step_overhead_s``."""
STEP_OVERHEAD_CONTEXT = 16
"""Context of the rows of that decode step."""


# --- phase 3: step overhead -----------------------------------------------------------


def measure_step_overhead(t: Target, repeat: int, head=None) -> dict:
    """Seconds of one runner decode step (``runner.generate.decode_step`` + the host copy of the tokens) of a
    ``STEP_OVERHEAD_LAYERS``-layer model at batch 1, minus its kernels (per-layer attention + rest, LM head),
    all timed round-robin so they share the machine's load; the minimum over repetitions of each."""
    n_layers = min(STEP_OVERHEAD_LAYERS, t.args.n_layers)
    ctx = min(STEP_OVERHEAD_CONTEXT, t.args.max_seq_len)
    model, _, _ = load_model(t.spec, dtype=t.torch_dtype, device=t.device, layers=(0, n_layers))
    model.setup_cache(1, ctx)
    rows = torch.zeros(1, dtype=torch.long)
    ids = torch.zeros(1, dtype=torch.long, device=t.device)

    def step():
        model.cache.lengths[rows] = ctx - 1  # rewind: every call decodes at the same position
        return runner_decode_step(model, ids, rows).tolist()

    shard = L.build_layer_shard(t.spec, 1, dtype=t.torch_dtype, device=t.device, max_rows=1, max_len=ctx)
    head = head if head is not None else L.build_head(t.spec, dtype=t.torch_dtype, device=t.device)
    fns = [step, L.attn_decode_region(shard, 1, ctx)[0], L.dense_decode_region(shard, 1)[0],
           L.lm_head_region(head, 1)[0]]
    s_step, s_attn, s_dense, s_head = time_interleaved(fns, repeat=max(3 * repeat, 30), device=t.device)
    kernels = n_layers * (s_attn.min_s + s_dense.min_s) + s_head.min_s
    return {"step_overhead_s": max(0.0, s_step.min_s - kernels), "decode_step_s": s_step.min_s,
            "kernels_s": kernels, "layers": n_layers, "context": ctx}


# --- the sweep ------------------------------------------------------------------------------------


class ProfileInterrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep. ``profile``: the partial profile (what was measured, the rest of every started table
    fitted, ``provenance["partial"]`` true), or None when no table of tp=1 had a measured point yet."""

    def __init__(self, profile: Profile | None):
        super().__init__("interrupted")
        self.profile = profile


@dataclass(frozen=True, slots=True)
class SweepOptions:
    """How one sweep runs (``profile_model``'s keywords, resolved)."""

    quick: bool
    collectives: bool = True
    progress: bool = True
    seed: int = 0
    engine: bool = True
    budget_s: float | None = None
    """Seconds the whole sweep may take (None: every point of the grid)."""
    report: Callable[[str], None] | None = None
    """Told the budget's plan, one line at a time, before anything is timed."""


COLLECTIVE_START_S = 8.0
"""Seconds of a collective group beyond its message sizes (two fresh interpreters, the rank slowdown probe)."""
COLLECTIVE_SIZE_S = 2.0
"""Seconds per message size of a group (every collective, loaded, at that size), beyond its bytes."""
COLLECTIVE_BYTE_S = 2.5e-6
"""Seconds per byte of one message size of a group: the hundreds of loaded hops and collectives at that size (on
2 CPU cores a group of two took about 45 s at 16 MiB, 2-3 s at 1 MiB and below)."""
MIN_COLLECTIVE_SIZES = 3
BUDGET_WAA_TURNOVERS = 2
"""Turnovers of a budgeted sweep's one WAA run (``profiler.engine.calibrate_waa``)."""
WAA_RESERVE = 0.35
"""Share of the engine phase's time kept for WAA's runs where two ranks run."""


def profile_model(model_spec: str | ModelShape, tp_degrees=(1,), quick: bool = False, dtype: str | None = None,
                  device: str | torch.device | None = None, *, grid: Grid | None = None, max_seq: int | None = None,
                  max_batch: int | None = None, max_tokens: int | None = None,
                  collectives: bool = True, progress: bool = True, seed: int = 0,
                  threads: int | None = None, engine: bool = True, budget_s: float | str | None = None,
                  workload: Workload | None = None, report: Callable[[str], None] | None = None) -> Profile:
    """Measure a Profile of ``model_spec`` on ``device``.

    Args:
        model_spec: a preset name of ``exegpt.models.MODELS``, an HF checkpoint folder, or ``"smollm2"``.
        tp_degrees: TP degrees to profile; each must divide the query and KV head counts and the FFN width.
            Each degree is profiled on this one device by building rank 0's shard.
        quick: the quick grid and fewer repetitions (``QUICK_REPEAT`` instead of ``REPEAT``); always, budgeted.
        dtype: 'fp32', 'fp16' or 'bf16'; default fp32 on CPU, the model's serving precision on GPU.
        device: 'cpu', 'cuda' or 'cuda:N'; default CUDA when available.
        grid: sizes to measure (default ``profiler.grid.make_grid``: attention up to the model's max_seq_len, or
            the workload's lengths; budgeted, batches up to what fits memory).
        max_seq: cap of the attention axes of the default grid (lookups beyond it are out of range).
        max_batch, max_tokens: caps of the default grid's batch and token axes (tables extrapolate beyond).
        collectives: also measure allreduce, alltoall, allgather / send_recv / kv_handoff in spawned process groups.
        progress: show a progress bar with the time left on stderr.
        seed: seed of the random weights.
        engine: also measure the runner executor's own overhead per step and per row (``profiler.engine``).
        threads: torch intra-op threads while timing (restored afterwards); default: leave torch's setting.
            On a CPU shared with other jobs, 1 thread avoids timing the scheduler (a parallel region waits for
            its slowest thread); the runner must then run with the same setting for the times to apply.
        budget_s: seconds (or a duration such as ``"5m"``) the sweep may take: it measures what the budget holds,
            cheapest points first, and fits the rest (``profiler.budget``); None: every point of the grid.
        workload: the lengths the profile must cover (an ``exegpt.Workload``): the grid stops at them.
        report: told the budget's plan before anything is timed, one line at a time.

    Returns:
        ``exegpt.Profile`` (seconds per layer on one rank of a TP group), with provenance.

    Raises:
        ExeGPTError: bad input (unknown model, bad grid, TP degree that splits heads, missing device, a budget
            <= 0 or shorter than the least the model's tables need, a workload longer than the model's context).
        ProfileInterrupted: Ctrl-C; holds the partial profile.
    """
    # Phase 1: inputs.
    budget = None if budget_s is None else parse_duration(budget_s)
    # A budget takes the quick grid and repeats: it spends its time on the points the solver reads, not on density.
    quick = quick or budget is not None
    t = resolve_target(model_spec, tp_degrees, quick, dtype, device, grid, max_seq, max_batch, max_tokens,
                       workload=workload, fit_memory=budget is not None)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ExeGPTError(f"threads {threads!r} must be an integer >= 1")
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(t, SweepOptions(quick=quick, collectives=collectives, progress=progress, seed=seed,
                                    engine=engine, budget_s=budget, report=report))
    finally:
        torch.set_num_threads(saved_threads)


@dataclass
class _Sweep:
    """What one sweep has measured so far (so that Ctrl-C can build a partial profile from it)."""

    t: Target
    o: SweepOptions
    kernels: KernelPhase
    clock: Clock
    started: _dt.datetime
    overhead: dict | None = None
    coll: CollectiveResult | None = None
    coll_note: str | None = None
    sizes: tuple[int, ...] = ()
    sp_tables: tuple = ()


def _run(t: Target, o: SweepOptions) -> Profile:
    """Phases 2-7 of ``profile_model`` for resolved inputs."""
    repeat = QUICK_REPEAT if o.quick else REPEAT
    budgeted = o.budget_s is not None
    clock = Clock(o.budget_s if budgeted else math.inf)
    say = o.report or (lambda line: None)
    s = _Sweep(t, o, KernelPhase(t, repeat, CostModel(t.device.type, WARMUP + repeat)), clock,
               _dt.datetime.now(_dt.timezone.utc))
    bar = _NoBar()
    try:
        kernel_end = PHASE_SHARES["kernels"] * o.budget_s if budgeted else math.inf
        if budgeted:  # Phase 2a: price the points on this machine, then plan and say what will be measured.
            s.kernels.probe()
        flops_cap = CPU_ATTN_FLOPS_BUDGET[o.quick] if t.device.type == "cpu" else None
        s.kernels.plan(kernel_end - clock.spent_s(), flops_cap)
        s.sizes, s.coll_note = _collective_sizes(t, o)
        if budgeted:
            _check_budget(s)
            for line in _plan_lines(s):
                say(line)
        bar = _progress(s.kernels.num_points + 2, f"profile {t.name}", enabled=o.progress)

        def tick(what: str) -> None:
            bar.update(1)
            bar.set_postfix_str(f"{what} | {clock.status()}" if budgeted else what)

        # Phase 2: the kernel tables, then phase 3: the step overhead.
        s.kernels.measure(clock, kernel_end, tick)
        tick("step overhead")
        s.overhead = measure_step_overhead(t, repeat, s.kernels.head)
        s.kernels.release()
        # Phase 4: collectives in spawned process groups.
        if s.sizes:
            tick("collectives")
            s.coll = measure_collectives(t.tp_degrees, s.sizes, device=t.device.type, dtype=t.dtype, quick=o.quick,
                                         probe_model=t.spec)
            if _sp_layer_wanted(t) and (not budgeted or clock.left_s() > 2 * SP_LAYER_S):
                # Phase 4b: Shift Parallelism's base-mode layer, timed whole on two ranks (from the engine's share)
                tick("sp layer")
                g = t.grid
                s.sp_tables = measure_sp_layer(t.spec, 2, points_for(g.tokens[-1], g.batches[-1], g.contexts[-1]),
                                               t.dtype)
        prof = _assemble(s, partial=False)
        # Phases 6, 7: the executor, by running plans.
        if o.engine:
            def on_run(k: int, n: int) -> None:
                bar.set_postfix_str(f"engine run {k}/{n} | {clock.status()}")
                bar.update(0)  # a line now and then off a terminal

            prof = _calibrate(prof, s, on_run)
    except ProfileInterrupted:
        raise
    except KeyboardInterrupt:
        bar.close()
        raise ProfileInterrupted(_assemble(s, partial=True)) from None
    finally:
        bar.close()
    return prof


def _collective_sizes(t: Target, o: SweepOptions) -> tuple[tuple[int, ...], str | None]:
    """The message sizes the collectives are measured at (empty: not measured) and why fewer than the grid's."""
    if not o.collectives:
        return (), "not measured (collectives off)"
    sizes = t.grid.bytes
    if o.budget_s is None:
        return sizes, None
    groups = len({tp for tp in t.tp_degrees if tp > 1} | {2})
    allot = PHASE_SHARES["collectives"] * o.budget_s
    while len(sizes) > MIN_COLLECTIVE_SIZES and _collective_s(groups, sizes) > allot:
        sizes = sizes[:-1]
    if _collective_s(groups, sizes) > allot:
        return (), f"not measured: about {format_duration(_collective_s(groups, sizes))} needed, the budget holds " \
                   f"{format_duration(allot)}"
    return sizes, None if sizes == t.grid.bytes else f"messages up to {sizes[-1]} bytes (the budget's)"


def _sp_layer_wanted(t: Target) -> bool:
    """Whether the sweep times Shift Parallelism's base-mode layer (``profiler.sp_layer``): on a CPU, with two
    ranks among the TP degrees, for a model whose KV heads split over them."""
    return t.device.type == "cpu" and 2 in t.tp_degrees and t.args.n_kv_heads >= 2


def _collective_s(groups: int, sizes: tuple[int, ...]) -> float:
    return groups * (COLLECTIVE_START_S + sum(COLLECTIVE_SIZE_S + COLLECTIVE_BYTE_S * b for b in sizes))


def _check_budget(s: _Sweep) -> None:
    """One line when the budget cannot hold one measurement of every table (the probe's time included)."""
    need = s.clock.spent_s() + s.kernels.minimum_s()
    if need > s.o.budget_s:
        raise ExeGPTError(f"budget {format_duration(s.o.budget_s)} is shorter than one measurement of each of "
                          f"{s.t.name}'s kernel tables on this machine ({MIN_POINTS} points a table, about "
                          f"{format_duration(need)}); expected a budget of at least {math.ceil(need)}s")


def _plan_lines(s: _Sweep) -> list[str]:
    """What the budgeted sweep will measure and fit, said before it starts."""
    b = s.o.budget_s
    lines = [f"budget {format_duration(b)} ({s.clock.status()} after pricing the points): kernel tables "
             f"{format_duration(PHASE_SHARES['kernels'] * b)}, "
             f"collectives {format_duration(PHASE_SHARES['collectives'] * b)}, "
             f"engine calibration the rest"]
    g = s.t.grid
    lines.append(f"  grid: batch <= {g.batches[-1]}, prompt <= {g.seqs[-1]}, context <= {g.contexts[-1]}, "
                 f"tokens <= {g.tokens[-1]} (beyond: fitted / extrapolated)")
    lines += [f"  {line}" for line in s.kernels.describe()]
    lines.append(f"  collectives: {s.coll_note or f'{len(s.sizes)} message sizes up to {s.sizes[-1]} bytes'}")
    if s.sizes and _sp_layer_wanted(s.t):
        lines.append("  Shift Parallelism's base-mode layer on 2 ranks: prefill and decode steps (profiler.sp_layer)")
    return lines


def _calibrate(prof: Profile, s: _Sweep, on_run) -> Profile:
    """Phases 6 and 7 within the time left (all of it without a budget); a Ctrl-C keeps what phases 2-5 made,
    marked partial."""
    from .engine import BUDGET_OUTPUT, OUTPUT, TURNOVERS, calibrate_engine, calibrate_waa, waa_run_cost_s

    t, o = s.t, s.o
    two_ranks = s.coll is not None and (t.device.type == "cpu" or torch.cuda.device_count() >= 2)
    left = s.clock.left_s()
    engine_s = left * (1 - WAA_RESERVE) if two_ranks else left
    try:
        prof = calibrate_engine(prof, t.spec, t.dtype, o.seed, max_seq_len=t.args.max_seq_len,
                                budget_s=None if o.budget_s is None else engine_s, on_run=on_run,
                                start_s=s.kernels.load_s)
        if two_ranks:
            runs, turnovers, output = 3, TURNOVERS, OUTPUT
            if o.budget_s is not None:  # one short run (the first plan), where the time left holds it
                turnovers, output = BUDGET_WAA_TURNOVERS, BUDGET_OUTPUT
                engine = prof.provenance.get("engine")
                overrun = engine.get("overrun", 1.0) if isinstance(engine, dict) else 1.0  # measured / priced
                cost = waa_run_cost_s(prof, 0, turnovers, s.kernels.load_s, output)
                runs = int(overrun * cost <= s.clock.left_s())
            if runs:
                prof = calibrate_waa(prof, t.spec, t.dtype, o.seed, runs=runs, turnovers=turnovers, output=output)
            else:
                prof = dataclasses.replace(prof, provenance=prof.provenance | {
                    "waa_period": "not measured: the budget held no WAA run"})
    except KeyboardInterrupt:
        raise ProfileInterrupted(dataclasses.replace(prof, provenance=prof.provenance | {"partial": True})) from None
    return dataclasses.replace(prof, provenance=prof.provenance | {
        "budget": prof.provenance["budget"] | {"spent_s": round(s.clock.spent_s(), 1)}})


def _assemble(s: _Sweep, partial: bool) -> Profile | None:
    """Phase 5: the Profile of what ``s`` measured (None when a required table at tp=1 has no measured point)."""
    t, o = s.t, s.o
    tables, fits, counts = s.kernels.tables()
    have = {(tb.kernel, tb.tp) for tb in tables}
    if any((k, 1) not in have for k in REQUIRED):
        return None
    # A TP degree interrupted before all its tables were started is left out (the solver then skips it).
    whole = {tp for tp in t.tp_degrees if all((k, tp) in have for k in REQUIRED if k is not Kernel.LM_HEAD)}
    tables = [tb for tb in tables if tb.tp in whole or tb.kernel is Kernel.LM_HEAD]
    dev_info = describe_device(t.device)
    coll_facts: dict = {}
    slowdown: tuple = ()
    concurrency: tuple = ()
    tables += list(s.sp_tables)
    if s.coll is not None:
        tables += list(s.coll.tables)
        coll_facts = {"backends": s.coll.facts, "skipped": s.coll.skipped, "rank_slowdown": s.coll.rank_slowdown,
                      "sizes": list(s.sizes)}
        slowdown = tuple(sorted((w, float(d["factor"])) for w, d in s.coll.rank_slowdown.items()))
        concurrency = tuple(sorted((w, float(d["concurrent"])) for w, d in s.coll.rank_slowdown.items()))
    overhead = s.overhead or {"step_overhead_s": 0.0, "note": "not measured (interrupted)"}
    finished = _dt.datetime.now(_dt.timezone.utc)
    budget = {"budget_s": o.budget_s, "spent_s": round(s.clock.spent_s(), 1), "tables": counts,
              "planned_s": round(s.kernels.cost_s(), 1)}
    provenance = {
        "tool": "profiler", "method_version": METHOD_VERSION, "spec": t.spec, "date": s.started.date().isoformat(),
        "started_utc": s.started.isoformat(timespec="seconds"),
        "wall_s": round((finished - s.started).total_seconds(), 1),
        "torch_version": torch.__version__, "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(), "device": dev_info.to_dict(),
        "cpu_kernels": cpu_kernels.config() if t.device.type == "cpu" else None,
        "dtype": t.dtype, "tp_degrees": sorted(whole), "quick": o.quick, "warmup": WARMUP,
        "repeat": QUICK_REPEAT if o.quick else REPEAT, "grid": t.grid.to_dict(), "seed": o.seed,
        "partial": partial, "budget": budget, "fits": fits,
        "statistic": "median over repeats; noisy points, and points slower than a point with more work, re-timed "
                     "(lower median kept); spread_s = p90 - p10 (fitted cells: the value times the fit's held-out "
                     "error)",
        "split": "attn_* = KV-cache update + runner.model.attend of runner.model.Attention (attn_decode on the CPU "
                 "decode kernels: RoPE + cache write + attention, runner.model.Attention.decode_core); "
                 "dense_* = norms, wqkv, RoPE (not where the decode core is fused), wo, feed-forward and residuals "
                 "(one call of runner.cpu_kernels.decode_layer without its core where the whole layer is fused) "
                 "of runner.model.TransformerBlock; "
                 "lm_head = embedding + final norm + LM head + argmax for `rows` rows; tp>1 = rank 0's shard "
                 "from runner.tp.apply_tp without its all-reduce (see allreduce)",
        "workload": "attn_encode: prompts padded to seq, one a token shorter when batch > 1 (the runner's "
                    "masked ragged path); attn_decode: rows at staggered positions, the longest at context "
                    "(the runner's masked mixed-batch path), or every row at context where the decode core "
                    "is fused (each row attends its own prefix: padded_decode false); batch 1 runs unmasked "
                    "in both",
        "extrapolate": "cells not measured are fitted (fits: form, coefficients, held-out error; tables' fitted "
                       "flags); linear beyond the grid for dense_*, lm_head, allreduce, alltoall, allgather, "
                       "send_recv, kv_handoff, attn_decode, and attn_encode when its seq axis reaches the longest "
                       "prompt",
        "step_overhead": overhead,
        "collectives": coll_facts if s.coll is not None else (s.coll_note or "not measured"),
        "model_args": {k: getattr(t.args, k) for k in ("family", "n_layers", "dim", "n_heads", "n_kv_heads",
                                                       "head_dim", "ffn_dim", "vocab_size", "max_seq_len")},
    }
    memory = dev_info.available_bytes if dev_info.kind == "cpu" else None
    return Profile(model=t.name, device=dev_info.name, tables=tuple(tables), dtype=t.dtype,
                   step_overhead_s=float(overhead["step_overhead_s"]), source="measured",
                   padded_batches=True,  # the runner pads prefill to the longest prompt
                   padded_decode=s.kernels.padded_decode,  # and attends decode rows over the longest, unless fused
                   handoff_on_compute=dev_info.kind == "cpu",  # gloo copies on the cores (Profile's doc)
                   device_memory_bytes=memory, kv_dtype=_kv_dtype(t),
                   packed_weight_dtype=_packed_weight_dtype(t), panel_weight_dtype=_panel_weight_dtype(t),
                   rank_slowdown=slowdown, rank_concurrency=concurrency, provenance=provenance)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from runner.progress import progress_bar

    return progress_bar(total, desc, "pt")
