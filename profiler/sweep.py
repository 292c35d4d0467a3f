"""The sweep: grid x kernels x TP degrees -> ``exegpt.Profile``.

Phases (``profile_model``):

1. **Inputs**: model arguments (``runner.weights.load_model``), device, dtype, TP degrees and grid are all checked
   before anything is timed, so bad input fails in a second with one line.
2. **Per-layer kernels, per TP degree** (``profiler.layer``): rank 0's shard of decoder layer 0, timed as the
   attention core (``attn_encode``, ``attn_decode``) and the rest of the layer (``dense_encode``,
   ``dense_decode``). ``rest + attention`` is one layer forward (``tests/profiler`` checks it).
3. **Whole-model pieces at tp=1**: ``lm_head(rows)`` and ``step_overhead_s``, the fixed per-step cost of the
   runner's decode step outside the per-layer kernels (Step construction, mask and RoPE gathers, cache
   bookkeeping, sampling and the host copy of the tokens).
4. **Collectives** (``profiler.collectives``): all-reduce per TP degree, send_recv and kv_handoff, in spawned
   process groups.
5. **The Profile**, with provenance (model, device, dtype, torch version, threads, date, grid).
6. **The executor** (``profiler.engine.calibrate_engine``, ``engine=True``): RRA plans run through the runner,
   the residual over the kernel tables tabulated as ``engine_encode`` / ``engine_decode``.
7. **WAA's two groups** (``profiler.engine.calibrate_waa``, with the collectives, where two ranks can run): WAA
   plans run on two ranks; their groups' concurrency (``Profile.rank_concurrency`` at two ranks, in place of the
   back-to-back probe of phase 4) and lockstep (``Profile.waa_period_factor``).

Extrapolation (``extrapolate: true``) is set only where a linear extension of the last segment is physically
right: the dense and LM-head tables (work linear in tokens / rows once the batch saturates the device), the
collectives (bandwidth-bound: linear in bytes), ``attn_decode`` (linear in rows and in context) and ``attn_encode``
when its sequence axis reaches the model's ``max_seq_len`` (then only the batch axis, where attention is linear,
can be exceeded by a valid request).

On CPUs, attention points whose work exceeds a FLOP budget are not run: they are the largest measured batch of
the same sequence length scaled linearly in the batch (attention over independent prompts is exactly linear in
their number once the machine is saturated). The provenance lists how many points were scaled.
"""

from __future__ import annotations

import datetime as _dt
import logging
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from exegpt.errors import ExeGPTError
from exegpt.models import MODELS, ModelShape
from exegpt.profile import Kernel, Profile, ProfileTable
from runner import cpu_kernels
from runner.generate import decode_step as runner_decode_step
from runner.model import ModelArgs
from runner.weights import load_model

from . import layer as L
from .collectives import TORCH_DTYPES, measure_collectives
from .device import describe_device, resolve_device
from .grid import Grid, make_grid
from .timer import QUICK_REPEAT, REPEAT, WARMUP, TimingStats, time_interleaved, time_region

log = logging.getLogger(__name__)

METHOD_VERSION = 13
"""Bumped whenever what the profiler measures changes (2: steady-state engine calibration and
``handoff_on_compute``; 3: the CPU decode kernels of ``runner.cpu_kernels``; 4: the rest of a fused
decode layer timed as one call; 5: a fused decode core timed with every row at the context, ``padded_decode``;
6: a pipeline hop as one message into a posted receive, ``runner.pipeline.CommandInbox``; 7: fused decode layers
called with packed weights, ``runner.cpu_kernels.LayerPack``; 8: the rank concurrency, ``Profile.rank_concurrency``;
9: decode batches above 8 rows on the weights' panels, ``Profile.panel_weight_dtype``, and the token axis holding
the backend's row breaks, ``runner.cpu_kernels.row_breaks``; 10: the WAA lockstep, ``Profile.waa_period_factor``;
11: the two-rank concurrency measured by WAA runs; 12: prefill attends causally without a padding mask,
``runner.model.prefill_step``; 13: all-to-all and all-gather tables, ``runner.ulysses``), so cached profiles of an
older method are measured again."""

CPU_ATTN_FLOPS_BUDGET = {True: 2e10, False: 2e11}
"""Largest attention work (FLOPs) measured per point on a CPU, for quick / full grids; beyond it the point is
scaled linearly in batch from the largest measured batch."""
STEP_OVERHEAD_LAYERS = 2
"""Decoder layers of the small model whose decode step is timed for ``step_overhead_s``."""
STEP_OVERHEAD_CONTEXT = 16
"""Context of the rows of that decode step."""


@dataclass(frozen=True, slots=True)
class Target:
    """The resolved inputs of one sweep."""

    spec: str
    """What ``runner.weights.load_model`` loads."""
    name: str
    """The profile's model name (an ``exegpt.models.MODELS`` key where one matches)."""
    args: ModelArgs
    device: torch.device
    dtype: str
    tp_degrees: tuple[int, ...]
    grid: Grid
    quick: bool

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]


# --- phase 1: inputs ------------------------------------------------------------------------------


def resolve_target(model_spec: str | ModelShape, tp_degrees=(1,), quick: bool = False, dtype: str | None = None,
                   device: str | torch.device | None = None, grid: Grid | None = None,
                   max_seq: int | None = None, max_batch: int | None = None,
                   max_tokens: int | None = None) -> Target:
    """Check every input and resolve defaults; one-line ``ExeGPTError`` on bad input. Loads no weights."""
    if isinstance(model_spec, ModelShape):
        if model_spec.name not in MODELS:
            raise ExeGPTError(f"model shape {model_spec.name!r} is not a preset; the profiler builds presets, "
                              f"HF folders or 'smollm2'")
        model_spec = model_spec.name
    if not isinstance(model_spec, str) or not model_spec:
        raise ExeGPTError(f"model {model_spec!r} must be a preset name, an HF checkpoint folder or 'smollm2'")
    spec = model_spec.lower() if model_spec.lower() in MODELS else model_spec
    dev = resolve_device(device)
    if spec in MODELS and MODELS[spec].is_encoder_decoder:
        raise ExeGPTError(f"the profiler times decoder-only llama/opt models; {spec!r} is an encoder-decoder (T5) "
                          f"model, not supported yet")
    # No layers, no embedding, no head: just the args (and the one-line error of an unknown model).
    _, args, _ = load_model(spec, layers=(0, 0), embed=False, head=False)
    if args.family not in ("llama", "opt"):
        raise ExeGPTError(f"the profiler times decoder-only llama/opt models; {spec!r} is family {args.family!r}")
    dtype = _resolve_dtype(spec, dtype, dev)
    degrees = _resolve_tp(args, tp_degrees)
    for name, v in (("max_seq", max_seq), ("max_batch", max_batch), ("max_tokens", max_tokens)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ExeGPTError(f"{name} {v!r} must be an integer >= 1")
    if grid is None:
        cap = min(args.max_seq_len, max_seq or args.max_seq_len)
        from runner.cpu_kernels import row_breaks

        grid = make_grid(_shape_for_grid(args, cap), quick=quick, max_batch=max_batch, max_tokens=max_tokens,
                         breaks=row_breaks(TORCH_DTYPES[dtype], dev))
    elif not isinstance(grid, Grid):
        raise ExeGPTError(f"grid must be a profiler.grid.Grid, got {type(grid).__name__}")
    if grid.max_len > args.max_seq_len:
        raise ExeGPTError(f"grid length {grid.max_len} exceeds the model's max_seq_len={args.max_seq_len}")
    return Target(spec=spec, name=_profile_name(spec, args), args=args, device=dev, dtype=dtype,
                  tp_degrees=degrees, grid=grid, quick=quick)


def _kv_dtype(t: Target) -> str | None:
    """The runner's KV-cache dtype for this target when it is not the model's (fp32 for half precision on CPU)."""
    from runner.model import cache_dtype

    kv = cache_dtype(t.torch_dtype, t.device)
    return None if kv == t.torch_dtype else _dtype_name(kv)


def _packed_weight_dtype(t: Target) -> str | None:
    """The dtype of the runner's prepacked copy of the Linear weights for this target (None: it keeps none)."""
    from runner.linear import packed_weight_dtype

    packed = packed_weight_dtype(t.torch_dtype, t.device)
    return None if packed is None else _dtype_name(packed)


def _panel_weight_dtype(t: Target) -> str | None:
    """The dtype of the runner's CPU kernels' panel copy of the Linear weights for this target (None: none)."""
    from runner.cpu_kernels import panel_dtype

    panels = panel_dtype(t.torch_dtype, t.device)
    return None if panels is None else _dtype_name(panels)


def _dtype_name(dtype: torch.dtype) -> str:
    """The profile's name of a torch dtype ('fp32', 'bf16', 'fp16')."""
    return next(k for k, v in TORCH_DTYPES.items() if v == dtype)


def _resolve_dtype(spec: str, dtype: str | None, dev: torch.device) -> str:
    if dtype is None:
        # CPUs run fp32 (the CPU presets' precision; bf16 matmuls on CPU are emulated on many parts);
        # GPUs the model's serving precision.
        return "fp32" if dev.type == "cpu" else (MODELS[spec].dtype if spec in MODELS else "bf16")
    if dtype not in TORCH_DTYPES:
        raise ExeGPTError(f"dtype {dtype!r} unknown; expected one of {', '.join(TORCH_DTYPES)}")
    return dtype


def _resolve_tp(args: ModelArgs, tp_degrees) -> tuple[int, ...]:
    try:
        degrees = tuple(tp_degrees)
    except TypeError:
        degrees = (tp_degrees,)
    if not degrees:
        raise ExeGPTError("no TP degree given; expected e.g. (1,) or (1, 2)")
    for tp in degrees:
        L.check_tp(args, tp)
    return tuple(sorted(set(degrees)))


def _shape_for_grid(args: ModelArgs, max_seq_len: int) -> ModelShape:
    return ModelShape(name=args.name or "model", family=args.family, n_layers=args.n_layers, dim=args.dim,
                      n_heads=args.n_heads, n_kv_heads=args.n_kv_heads, ffn_dim=args.ffn_dim,
                      vocab_size=args.vocab_size, max_seq_len=max_seq_len, head_dim=args.head_dim)


def _profile_name(spec: str, args: ModelArgs) -> str:
    if spec in MODELS:
        return spec
    if args.name in MODELS:
        return args.name
    return Path(args.name).name if args.name else (Path(spec).name or spec)


# --- phase 2: per-layer kernels -------------------------------------------------------------------


NOISY_SPREAD = 0.5
"""A point whose spread (p90 - p10) exceeds this fraction of its median is timed once more."""


def measure(fn: Callable[[], object], setup: Callable[[], object] | None, repeat: int,
            device: torch.device) -> TimingStats:
    """``time_region``, retried once with twice the repeats when the first try was noisy; the try with the lower
    median is kept (background load only ever adds time, and the monotone envelope of a table would spread a
    spike to every larger size)."""
    s = time_region(fn, setup=setup, repeat=repeat, device=device)
    if s.spread_s > NOISY_SPREAD * s.median_s:
        s2 = time_region(fn, setup=setup, repeat=2 * repeat, device=device)
        s = min(s, s2, key=lambda x: x.median_s)
    return s


def _attn_flops(shard: L.LayerShard, batch: int, length: int, decode: bool) -> float:
    """QK^T and PV multiply-adds (x2 FLOPs each) of one attention point, without a causal discount."""
    a = shard.block.attention
    q_len = 1 if decode else length
    return 4.0 * batch * a.n_heads * q_len * length * a.head_dim


def _sweep_attention(shard: L.LayerShard, kernel: Kernel, batches: tuple[int, ...], lengths: tuple[int, ...],
                     budget: float | None, repeat: int, tick: Callable[[int], None]) -> tuple[ProfileTable, int]:
    """One 2-D attention table; returns it and the number of points scaled instead of measured."""
    decode = kernel is Kernel.ATTN_DECODE
    region = L.attn_decode_region if decode else L.attn_encode_region
    stats: dict[tuple[int, int], TimingStats] = {}
    base: dict[tuple[int, int], tuple[int, int]] = {}  # scaled point -> the measured point it scales
    for j, length in enumerate(lengths):
        last = None  # the largest measured batch at this length
        for i, batch in enumerate(batches):
            if last is not None and budget is not None and _attn_flops(shard, batch, length, decode) > budget:
                base[i, j] = last
            else:
                stats[i, j] = measure(*region(shard, batch, length), repeat, shard.device)
                last = (i, j)
            tick(1)

    def remeasure(ij):
        return measure(*region(shard, batches[ij[0]], lengths[ij[1]]), repeat, shard.device)

    def table():
        med = np.zeros((len(batches), len(lengths)))
        spread = np.zeros_like(med)
        for ij, s in stats.items():
            med[ij], spread[ij] = s.median_s, s.spread_s
        for ij, b in base.items():
            factor = batches[ij[0]] / batches[b[0]]
            med[ij], spread[ij] = stats[b].median_s * factor, stats[b].spread_s * factor
        return med, spread

    _despike(stats, table, remeasure)
    med, spread = table()
    extrapolate = decode or lengths[-1] >= shard.full_args.max_seq_len
    out = ProfileTable(kernel=kernel, tp=shard.tp, xs=_f(batches), ys=_f(lengths), seconds=_t2(med),
                       spread_s=_t2(spread), extrapolate=extrapolate)
    return out, len(base)


SPIKE = 1.3
"""A measured point more than this factor above a point with more work (larger along any axis) is noise."""
DESPIKE_PASSES = 2


def _despike(stats: dict, table: Callable[[], tuple[np.ndarray, np.ndarray]],
             remeasure: Callable[[tuple], TimingStats]) -> None:
    """Re-time measured points that are slower than a neighbour with more work (physically impossible, so
    background load), keeping the lower median; in place on ``stats`` (keys: index tuples into the table)."""
    for _ in range(DESPIKE_PASSES):
        med, _ = table()
        bad = []
        for idx in stats:
            for axis in range(med.ndim):
                nxt = list(idx)
                nxt[axis] += 1
                if nxt[axis] < med.shape[axis] and med[idx] > SPIKE * med[tuple(nxt)]:
                    bad.append(idx)
                    break
        if not bad:
            return
        for idx in bad:
            stats[idx] = min(stats[idx], remeasure(idx), key=lambda x: x.median_s)


def _sweep_1d(kernel: Kernel, tp: int, xs: tuple[int, ...], region: Callable[[int], L.Region], repeat: int,
              device: torch.device, tick: Callable[[int], None]) -> ProfileTable:
    """A 1-D table of ``region(x)`` over ``xs`` (de-spiked like the attention tables)."""
    stats = {}
    for i, x in enumerate(xs):
        stats[(i,)] = measure(*region(x), repeat, device)
        tick(1)

    def table():
        med = np.array([stats[(i,)].median_s for i in range(len(xs))])
        return med, med

    _despike(stats, table, lambda idx: measure(*region(xs[idx[0]]), repeat, device))
    return _table_1d(kernel, tp, xs, [stats[(i,)] for i in range(len(xs))])


def _sweep_dense(shard: L.LayerShard, kernel: Kernel, tokens: tuple[int, ...], repeat: int,
                 tick: Callable[[int], None]) -> ProfileTable:
    region = L.dense_decode_region if kernel is Kernel.DENSE_DECODE else L.dense_encode_region
    return _sweep_1d(kernel, shard.tp, tokens, lambda n: region(shard, n), repeat, shard.device, tick)


def _table_1d(kernel: Kernel, tp: int, xs: tuple[int, ...], stats: list[TimingStats]) -> ProfileTable:
    return ProfileTable(kernel=kernel, tp=tp, xs=_f(xs), ys=(), seconds=tuple(s.median_s for s in stats),
                        spread_s=tuple(s.spread_s for s in stats), extrapolate=True)


def _f(xs) -> tuple[float, ...]:
    return tuple(float(x) for x in xs)


def _t2(a: np.ndarray) -> tuple:
    return tuple(tuple(float(v) for v in row) for row in a)


# --- phase 3: LM head and step overhead -----------------------------------------------------------


def _sweep_lm_head(t: Target, repeat: int, tick: Callable[[int], None]) -> ProfileTable:
    head = L.build_head(t.spec, dtype=t.torch_dtype, device=t.device)
    return _sweep_1d(Kernel.LM_HEAD, 1, t.grid.batches, lambda n: L.lm_head_region(head, n), repeat, t.device,
                     tick)


def measure_step_overhead(t: Target, repeat: int) -> dict:
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
    head = L.build_head(t.spec, dtype=t.torch_dtype, device=t.device)
    fns = [step, L.attn_decode_region(shard, 1, ctx)[0], L.dense_decode_region(shard, 1)[0],
           L.lm_head_region(head, 1)[0]]
    s_step, s_attn, s_dense, s_head = time_interleaved(fns, repeat=max(3 * repeat, 30), device=t.device)
    kernels = n_layers * (s_attn.min_s + s_dense.min_s) + s_head.min_s
    return {"step_overhead_s": max(0.0, s_step.min_s - kernels), "decode_step_s": s_step.min_s,
            "kernels_s": kernels, "layers": n_layers, "context": ctx}


# --- the sweep ------------------------------------------------------------------------------------


def profile_model(model_spec: str | ModelShape, tp_degrees=(1,), quick: bool = False, dtype: str | None = None,
                  device: str | torch.device | None = None, *, grid: Grid | None = None, max_seq: int | None = None,
                  max_batch: int | None = None, max_tokens: int | None = None,
                  collectives: bool = True, progress: bool = True, seed: int = 0,
                  threads: int | None = None, engine: bool = True) -> Profile:
    """Measure a Profile of ``model_spec`` on ``device``.

    Args:
        model_spec: a preset name of ``exegpt.models.MODELS``, an HF checkpoint folder, or ``"smollm2"``.
        tp_degrees: TP degrees to profile; each must divide the query and KV head counts and the FFN width.
            Each degree is profiled on this one device by building rank 0's shard.
        quick: the quick grid and fewer repetitions (``QUICK_REPEAT`` instead of ``REPEAT``).
        dtype: 'fp32', 'fp16' or 'bf16'; default fp32 on CPU, the model's serving precision on GPU.
        device: 'cpu', 'cuda' or 'cuda:N'; default CUDA when available.
        grid: sizes to measure (default ``profiler.grid.make_grid``: attention up to the model's max_seq_len).
        max_seq: cap of the attention axes of the default grid (lookups beyond it are out of range).
        max_batch, max_tokens: caps of the default grid's batch and token axes (tables extrapolate beyond).
        collectives: also measure allreduce, alltoall, allgather / send_recv / kv_handoff in spawned process groups.
        progress: show a tqdm bar with an ETA on stderr.
        seed: seed of the random weights.
        engine: also measure the runner executor's own overhead per step and per row (``profiler.engine``).
        threads: torch intra-op threads while timing (restored afterwards); default: leave torch's setting.
            On a CPU shared with other jobs, 1 thread avoids timing the scheduler (a parallel region waits for
            its slowest thread); the runner must then run with the same setting for the times to apply.

    Returns:
        ``exegpt.Profile`` (seconds per layer on one rank of a TP group), with provenance.

    Raises:
        ExeGPTError: bad input (unknown model, bad grid, TP degree that splits heads, missing device).
    """
    # Phase 1: inputs.
    t = resolve_target(model_spec, tp_degrees, quick, dtype, device, grid, max_seq, max_batch, max_tokens)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ExeGPTError(f"threads {threads!r} must be an integer >= 1")
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(t, quick, collectives, progress, seed, engine)
    finally:
        torch.set_num_threads(saved_threads)


def _run(t: Target, quick: bool, collectives: bool, progress: bool, seed: int, engine: bool = True) -> Profile:
    """Phases 2-5 of ``profile_model`` for resolved inputs."""
    repeat = QUICK_REPEAT if quick else REPEAT
    g = t.grid
    budget = CPU_ATTN_FLOPS_BUDGET[quick] if t.device.type == "cpu" else None
    dev_info = describe_device(t.device)
    num_coll_groups = len({tp for tp in t.tp_degrees if tp > 1} | {2}) if collectives else 0
    total = (len(t.tp_degrees) * (len(g.batches) * (len(g.seqs) + len(g.contexts)) + 2 * len(g.tokens))
             + len(g.batches) + 1 + num_coll_groups)
    bar = _progress(total, f"profile {t.name} on {dev_info.name}", enabled=progress)
    started = _dt.datetime.now(_dt.timezone.utc)
    tables: list[ProfileTable] = []
    notes: dict = {}
    try:
        # Phase 2: per-layer kernels, one shard per TP degree.
        for tp in t.tp_degrees:
            bar.set_postfix_str(f"tp={tp} layer")
            shard = L.build_layer_shard(t.spec, tp, dtype=t.torch_dtype, device=t.device, max_rows=g.max_rows,
                                        max_len=g.max_len, seed=seed)
            padded_decode = not L.own_prefix_decode(shard)
            enc, n_enc = _sweep_attention(shard, Kernel.ATTN_ENCODE, g.batches, g.seqs, budget, repeat, bar.update)
            dec, n_dec = _sweep_attention(shard, Kernel.ATTN_DECODE, g.batches, g.contexts, budget, repeat,
                                          bar.update)
            tables += [enc, dec,
                       _sweep_dense(shard, Kernel.DENSE_ENCODE, g.tokens, repeat, bar.update),
                       _sweep_dense(shard, Kernel.DENSE_DECODE, g.tokens, repeat, bar.update)]
            if n_enc or n_dec:
                notes[f"tp{tp}_scaled_points"] = {"attn_encode": n_enc, "attn_decode": n_dec}
            del shard
        # Phase 3: LM head and the fixed per-step overhead (tp=1, whole).
        bar.set_postfix_str("lm_head")
        tables.append(_sweep_lm_head(t, repeat, bar.update))
        bar.set_postfix_str("step overhead")
        overhead = measure_step_overhead(t, repeat)
        bar.update(1)
        # Phase 4: collectives in spawned process groups.
        coll_facts: dict = {}
        slowdown: tuple = ()
        concurrency: tuple = ()
        if collectives:
            bar.set_postfix_str("collectives")
            res = measure_collectives(t.tp_degrees, g.bytes, device=t.device.type, dtype=t.dtype, quick=quick,
                                      progress=bar.update, probe_model=t.spec)
            tables += list(res.tables)
            coll_facts = {"backends": res.facts, "skipped": res.skipped, "rank_slowdown": res.rank_slowdown}
            slowdown = tuple(sorted((w, float(d["factor"])) for w, d in res.rank_slowdown.items()))
            concurrency = tuple(sorted((w, float(d["concurrent"])) for w, d in res.rank_slowdown.items()))
    finally:
        bar.close()
    # Phase 5: the Profile.
    finished = _dt.datetime.now(_dt.timezone.utc)
    provenance = {
        "tool": "profiler", "method_version": METHOD_VERSION, "spec": t.spec, "date": started.date().isoformat(),
        "started_utc": started.isoformat(timespec="seconds"), "wall_s": round((finished - started).total_seconds(), 1),
        "torch_version": torch.__version__, "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(), "device": dev_info.to_dict(),
        "cpu_kernels": cpu_kernels.config() if t.device.type == "cpu" else None,
        "dtype": t.dtype, "tp_degrees": list(t.tp_degrees), "quick": quick, "warmup": WARMUP, "repeat": repeat,
        "grid": g.to_dict(), "seed": seed,
        "statistic": "median over repeats; noisy points, and points slower than a point with more work, re-timed "
                     "(lower median kept); spread_s = p90 - p10",
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
        "extrapolate": "linear beyond the grid for dense_*, lm_head, allreduce, alltoall, allgather, send_recv, "
                       "kv_handoff, attn_decode, and attn_encode when its seq axis reaches max_seq_len",
        "attn_flops_budget": budget, "step_overhead": overhead,
        "collectives": coll_facts if collectives else "not measured",
        "model_args": {k: getattr(t.args, k) for k in ("family", "n_layers", "dim", "n_heads", "n_kv_heads",
                                                       "head_dim", "ffn_dim", "vocab_size", "max_seq_len")},
    } | notes
    memory = dev_info.available_bytes if dev_info.kind == "cpu" else None
    prof = Profile(model=t.name, device=dev_info.name, tables=tuple(tables), dtype=t.dtype,
                   step_overhead_s=float(overhead["step_overhead_s"]), source="measured",
                   padded_batches=True,  # the runner pads prefill to the longest prompt
                   padded_decode=padded_decode,  # and attends decode rows over the longest, unless fused
                   handoff_on_compute=dev_info.kind == "cpu",  # gloo copies on the cores (Profile's doc)
                   device_memory_bytes=memory, kv_dtype=_kv_dtype(t),
                   packed_weight_dtype=_packed_weight_dtype(t), panel_weight_dtype=_panel_weight_dtype(t),
                   rank_slowdown=slowdown, rank_concurrency=concurrency,
                   provenance=provenance)
    if engine and not t.args.family == "t5":
        # Phase 6: the executor's own overhead around the kernels, measured by running it (profiler.engine).
        from .engine import calibrate_engine, calibrate_waa
        prof = calibrate_engine(prof, t.spec, t.dtype, seed, max_seq_len=t.args.max_seq_len)
        if collectives and (t.device.type == "cpu" or torch.cuda.device_count() >= 2):
            # Phase 7: the lockstep of a WAA plan's two groups, by running one on two ranks.
            prof = calibrate_waa(prof, t.spec, t.dtype, seed)
    return prof


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
