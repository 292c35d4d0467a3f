"""Phase 1 of a sweep: its inputs checked and resolved (model, device, dtype, TP degrees, workload, grid) before
anything is loaded or timed, so that bad input fails in seconds with one line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from exegpt.errors import ExeGPTError
from exegpt.models import MODELS, ModelShape
from exegpt.workload import Workload
from runner.model import ModelArgs
from runner.weights import load_model

from . import layer as L
from .collectives import TORCH_DTYPES
from .device import describe_device, resolve_device
from .grid import FULL_MAX_BATCH, FULL_MAX_BYTES, FULL_MAX_TOKENS, QUICK_MAX_BATCH, QUICK_MAX_BYTES, \
    QUICK_MAX_TOKENS, Grid, fitting_batch, make_grid

MIN_BATCH_AXIS = 32
"""The batch axis reaches at least this far whatever the memory (the largest batches fitted where they do not
fit; ``profiler.budget.MEMORY_CAP_BYTES``)."""


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
    max_prompt: int = 0
    """The longest prompt a request can have (the workload's, else the model's context): ``attn_encode``
    extrapolates in batch when its seq axis reaches it."""

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]


def resolve_target(model_spec: str | ModelShape, tp_degrees=(1,), quick: bool = False, dtype: str | None = None,
                   device: str | torch.device | None = None, grid: Grid | None = None,
                   max_seq: int | None = None, max_batch: int | None = None,
                   max_tokens: int | None = None, workload: Workload | None = None,
                   fit_memory: bool = False) -> Target:
    """Check every input and resolve defaults; one-line ``ExeGPTError`` on bad input. Loads no weights.

    ``workload``: the lengths the profile must cover (the default grid's attention axes stop at its longest
    prompt and context); ``fit_memory``: the default grid's batch axis stops at the largest batch whose KV cache
    fits this device's memory at the grid's longest context (a budgeted sweep)."""
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
    prompt_cap = context_cap = min(args.max_seq_len, max_seq or args.max_seq_len)
    if workload is not None:
        if not isinstance(workload, Workload):
            raise ExeGPTError(f"workload must be an exegpt.Workload, got {type(workload).__name__}")
        if workload.max_total_len > args.max_seq_len:
            raise ExeGPTError(f"workload {workload.name or ''} reaches {workload.max_total_len} tokens (prompt "
                              f"{workload.input_len.max} + output {workload.output_len.max}), longer than "
                              f"{args.name or spec}'s context of {args.max_seq_len}; expected requests within "
                              f"the context (exegpt's --max-context clip or drop)".replace("workload  ", "workload "))
        prompt_cap, context_cap = min(prompt_cap, workload.input_len.max), min(context_cap, workload.max_total_len)
    if grid is None:
        from runner.cpu_kernels import row_breaks

        if fit_memory and max_batch is None:
            max_batch = _fitting_batch(args, dtype, dev, context_cap, quick)
        grid = make_grid(_shape_for_grid(args, context_cap), quick=quick, max_batch=max_batch,
                         max_tokens=max_tokens, breaks=row_breaks(TORCH_DTYPES[dtype], dev), max_seq=prompt_cap,
                         max_context=context_cap,
                         max_bytes=_largest_message(args, dtype, max_tokens, quick) if fit_memory else None)
    elif not isinstance(grid, Grid):
        raise ExeGPTError(f"grid must be a profiler.grid.Grid, got {type(grid).__name__}")
    if grid.max_len > args.max_seq_len:
        raise ExeGPTError(f"grid length {grid.max_len} exceeds the model's max_seq_len={args.max_seq_len}")
    max_prompt = min(args.max_seq_len, workload.input_len.max) if workload is not None else args.max_seq_len
    return Target(spec=spec, name=_profile_name(spec, args), args=args, device=dev, dtype=dtype,
                  tp_degrees=degrees, grid=grid, quick=quick, max_prompt=max_prompt)


def _fitting_batch(args: ModelArgs, dtype: str, dev: torch.device, context: int, quick: bool) -> int:
    """The largest batch (at most the quick / full grid's, at least ``MIN_BATCH_AXIS``) whose KV cache of
    ``context`` tokens a row fits this device's free memory beside the weights (and the CPU runner's packed copies
    of them)."""
    from runner.model import cache_dtype

    info = describe_device(dev)
    elem = TORCH_DTYPES[dtype].itemsize
    kv_elem = cache_dtype(TORCH_DTYPES[dtype], dev).itemsize
    kv_per_token = args.n_layers * 2 * args.n_kv_heads * args.head_dim * kv_elem
    layer = args.dim * (args.n_heads + 2 * args.n_kv_heads) * args.head_dim + args.n_heads * args.head_dim * args.dim \
        + (3 if args.gated_ffn else 2) * args.dim * args.ffn_dim
    copies = 3 if dev.type == "cpu" else 1  # the weights, oneDNN's packed copy, the decode kernels' panels
    weights = (copies * args.n_layers * layer + 2 * args.vocab_size * args.dim) * elem
    limit = QUICK_MAX_BATCH if quick else FULL_MAX_BATCH
    # Small batches are cheap and every fit needs them; a point whose cache would not fit is fitted, not run.
    return max(min(MIN_BATCH_AXIS, limit), fitting_batch(info.available_bytes, weights, kv_per_token, context, limit))


def _largest_message(args: ModelArgs, dtype: str, max_tokens: int | None, quick: bool) -> int:
    """The largest message the solver asks the collective tables for inside the grid: the hidden states of the
    dense tables' most tokens (larger hand-offs extrapolate linearly: bandwidth-bound)."""
    tokens = max_tokens or (QUICK_MAX_TOKENS if quick else FULL_MAX_TOKENS)
    return int(min(QUICK_MAX_BYTES if quick else FULL_MAX_BYTES, tokens * args.dim * TORCH_DTYPES[dtype].itemsize))


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
