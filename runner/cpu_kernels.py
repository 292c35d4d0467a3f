"""Fused CPU decode kernels (``runner/csrc/cpu_kernels.c``), built once with the system C compiler and called
through ctypes.

At decode a Linear layer multiplies a few rows by a weight it streams from memory once. On CPUs without bf16
instructions torch 2.13 emulates the bf16 GEMM (~10 GB/s, slower with every row), and every eager op costs
microseconds of dispatch. The kernels stream each weight row once, convert bf16 in registers, and fuse the gated
feed-forward and RMSNorm. The model's modules call them for ``rows <= max_rows(dtype)`` and use torch otherwise.

The shared library is compiled on first use with ``$CC`` (default ``cc``) ``-O3 -march=native -fopenmp`` into
``$EXEGPT_CACHE/kernels`` (default ``~/.cache/exegpt/kernels``), named by a hash of the source, the flags and the
compiler, so concurrent ranks and later runs reuse one build. Without a compiler, or with ``EXEGPT_CPU_KERNELS=0``,
everything runs on torch ops (one warning says why). OpenMP threads come from the libgomp torch already loaded, so
``torch.set_num_threads`` governs both.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from exegpt.errors import ExeGPTError
from runner import numerics

SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.c"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-lm")
ABI_VERSION = 7
DTYPES = {torch.float32: 0, torch.bfloat16: 1}
ACTS = {"silu": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3}

_NATIVE_BF16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()

MAX_ROWS = {torch.float32: 64, torch.bfloat16: 4 if _NATIVE_BF16 else 64}
"""Most rows one kernel call takes, per dtype; beyond, torch's GEMMs (oneDNN on a packed weight).
NOTE (torch 2.13, 2 AVX2 cores; ``python -m benchmarks.kernels [--model small]``): with register tiles of up to
4x3 rows the kernels matched oneDNN's fp32 GEMM up to 64 rows on SmolLM2's and ``small``'s weights (0.9-1.1x from
24 to 64 rows) and beat it below; on the weights' panels (``STREAM_ROWS``) they run 1.2-1.6x faster than that at
9-32 rows and about as fast as oneDNN at 64 (90 vs 92 GFLOP/s, 64 x 256 x 1024), which stays faster at hundreds of
rows (93-107 vs 118-126). A whole decode step (``model.decode``, fused layers on the kernels against torch's ops),
best of three rounds in one process: ``tiny`` fp32 1.9-2.2x faster at 33-64 rows, 1.1x at 256; ``small`` fp32
1.45x at 33, 1.09x at 64, 0.96x at 128; SmolLM2 bf16 1.28x at 33, 1.13x at 64, 0.85x at 128. So 64 (32 before).
Where the CPU has bf16 instructions oneDNN multiplies bf16 natively (AMX), and the kernels take up to 4 rows:
measured on 2 Xeon cores with AMX, SmolLM2's Linear weights took 1.66 / 1.49 / 1.15x as long through
oneDNN as through the kernels at 1 / 2 / 4 rows and 0.81x at 8, and a whole SmolLM2 decode step of 2 / 4 rows fell
from 36.8 / 45.7 ms (1 row on the kernels) to 21.6 / 29.2 ms; fp32 keeps 64 there too (``small``'s step at 32 rows:
6.6 ms at 64 against 7.2 at 16)."""

STREAM_ROWS = 8
"""Calls of more rows than this multiply by the weights' panels (``panels``) when they are given: a k-major copy
of the weight whose outer products run 1.2-1.6x faster at 9-64 rows than the dot products of calls that stream
the weight as torch stores it, with the same bits (``csrc/panels.h``). The build's own value must agree."""

_lib: ctypes.CDLL | None = None
_tried = False


def cache_dir() -> Path:
    return Path(os.environ.get("EXEGPT_CACHE", Path.home() / ".cache" / "exegpt")) / "kernels"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def _source_bytes() -> bytes:
    """The kernels' source: ``SOURCE`` and the headers beside it, which it includes."""
    return b"".join(f.read_bytes() for f in (SOURCE, *sorted(SOURCE.parent.glob("*.h"))))


def _build(cc: str) -> Path:
    """Compiles the source into the cache (atomically: concurrent ranks may race) and returns the library path."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256(_source_bytes() + repr((FLAGS, version)).encode()).hexdigest()[:16]
    out = cache_dir() / f"cpu_kernels-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        res = subprocess.run([cc, str(SOURCE), "-o", tmp, *FLAGS], capture_output=True, text=True)
        if res.returncode:
            err = next((line for line in res.stderr.splitlines() if "error" in line), f"exit {res.returncode}")
            raise OSError(f"{cc} failed to build {SOURCE.name}: {err.strip()}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def load() -> ctypes.CDLL | None:
    """The kernel library, built on first call; None where it cannot be (warned once) or is switched off."""
    global _lib, _tried
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("EXEGPT_CPU_KERNELS", "1") == "0":
        return None
    cc = _compiler()
    if cc is None:
        warnings.warn("runner: no C compiler found ($CC, cc, gcc); CPU decode runs on torch ops only", stacklevel=2)
        return None
    try:
        lib = ctypes.CDLL(str(_build(cc)))
    except OSError as e:
        warnings.warn(f"runner: CPU kernels unavailable ({e}); CPU decode runs on torch ops only", stacklevel=2)
        return None
    if lib.xg_abi_version() != ABI_VERSION or lib.xg_stream_rows() != STREAM_ROWS:
        warnings.warn("runner: stale CPU kernel build; CPU decode runs on torch ops only", stacklevel=2)
        return None
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.xg_linear.argtypes = [p, p, p, p, p, p, i, i, i, i]
    lib.xg_gated.argtypes = [p, p, p, p, p, p, p, p, i, i, i, i, i]
    lib.xg_rmsnorm.argtypes = [p, p, p, i, i, i, ctypes.c_float]
    i64 = ctypes.c_int64
    lib.xg_attn_decode.argtypes = [p, p, p, i64, p, p, i64, p, p, i64, p, i, i, i, i, i, ctypes.c_float]
    lib.xg_decode_layer.argtypes = [p, p, p, p, p, p, p, i64, p, p, i64, p, p, i64, p, p, p, p, p, p, p, p, p, p,
                                    i, i, i, i, i, i, i, i, ctypes.c_float, ctypes.c_float, i]
    lib.xg_pack_panels.argtypes = [p, i, i, i, p]
    lib.xg_panel_elems.argtypes = [i, i]
    lib.xg_panel_elems.restype = i64
    for f in (lib.xg_linear, lib.xg_gated, lib.xg_rmsnorm, lib.xg_attn_decode, lib.xg_decode_layer,
              lib.xg_pack_panels, lib.xg_stream_rows):
        f.restype = i
    _lib = lib
    return lib


def config() -> dict | None:
    """What decides which calls run on the kernels and how fast (for profile provenance and cache keys: a change
    of the kernels' source re-measures cached profiles), None when off."""
    if load() is None:
        return None
    return {"abi": ABI_VERSION, "max_rows": {str(d).removeprefix("torch."): n for d, n in MAX_ROWS.items()},
            "source": hashlib.sha256(_source_bytes()).hexdigest()[:12]}


def usable(x: Tensor, *weights: Tensor, any_rows: bool = False) -> bool:
    """Whether the kernels take ``x`` ``[..., K]`` with ``weights``: CPU, no autograd, a supported dtype shared by
    all, at most ``MAX_ROWS`` rows (unless ``any_rows``: row-wise kernels), and the library built."""
    dt = x.dtype
    if x.device.type != "cpu" or dt not in MAX_ROWS:
        return False
    # Batch-invariant numerics (runner.numerics): the kernels for every row count, as their sums are in one order.
    if not any_rows and not numerics.on() and x.numel() // max(x.shape[-1], 1) > MAX_ROWS[dt]:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)):
        return False
    return all(w.dtype == dt and w.is_contiguous() for w in weights) and load() is not None


def check_batch_invariant(device: torch.device, dtype: str) -> None:
    """One clear line where batch-invariant numerics (``runner.numerics``) cannot hold: they need these kernels
    (a CPU rank, a C compiler) and a precision the kernels take (fp32, bf16)."""
    if device.type != "cpu" or load() is None:
        raise ExeGPTError(f"batch-invariant numerics need the runner's CPU kernels (a CPU rank and a C compiler); "
                          f"this rank runs on {device.type}"
                          + ("" if device.type != "cpu" else " without them (EXEGPT_CPU_KERNELS=0 or no compiler)"))
    if dtype not in ("fp32", "bf16"):
        raise ExeGPTError(f"batch-invariant numerics take dtype fp32 or bf16, got {dtype!r}")


def _require() -> ctypes.CDLL:
    lib = load()
    if lib is None:
        raise RuntimeError("runner CPU kernels are unavailable here (see the warning, or EXEGPT_CPU_KERNELS=0); "
                           "check cpu_kernels.usable() before calling them")
    return lib


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(rc: int, name: str) -> None:
    if rc:
        raise MemoryError(f"runner CPU kernel {name} could not allocate its input buffer")


def _check_panels(weight: Tensor, weight_panels: Tensor) -> None:
    N, K = weight.shape
    want = (_lib or _require()).xg_panel_elems(N, K)
    if weight_panels.numel() != want or weight_panels.dtype != weight.dtype:
        raise ValueError(f"weight_panels of {weight_panels.numel()} {weight_panels.dtype} elements do not match a "
                         f"{N}x{K} {weight.dtype} weight (expected {want} elements: cpu_kernels.panels(weight))")


def panels(weight: Tensor) -> Tensor:
    """``weight`` ``[N, K]`` re-laid as the kernels' panels (``csrc/panels.h``), in its dtype: one more copy of it,
    which calls of more than ``STREAM_ROWS`` rows multiply by."""
    lib = _lib or _require()
    N, K = weight.shape
    w = weight.detach().contiguous()
    out = torch.empty(lib.xg_panel_elems(N, K), dtype=w.dtype)
    lib.xg_pack_panels(w.data_ptr(), DTYPES[w.dtype], N, K, out.data_ptr())
    return out


def cached_panels(owner: torch.nn.Module, weight: Tensor) -> Tensor:
    """``panels(weight)``, kept on ``owner`` (built on the first call that needs it) and rebuilt when the weight is
    replaced (``apply_tp``) or written in place (its version changes)."""
    cached = owner.__dict__.get("_panels")
    if cached is not None and cached[0]() is weight and cached[1] == weight._version:
        return cached[2]
    out = panels(weight)
    owner.__dict__["_panels"] = (weakref.ref(weight), weight._version, out)
    return out


def panel_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype | None:
    """The dtype of the panel copy of every Linear weight a model of ``dtype`` keeps on ``device`` once it decodes
    batches of more than ``STREAM_ROWS`` rows (the weight's own), or None where it never builds one. The profiler
    records it so that plans count its memory."""
    if device.type != "cpu" or MAX_ROWS.get(dtype, 0) <= STREAM_ROWS or load() is None:
        return None
    return dtype


def row_breaks(dtype: torch.dtype, device: torch.device) -> tuple[int, ...]:
    """Row counts where a decode layer of ``dtype`` on ``device`` changes how it computes: the last count of one
    way and the first of the next (streamed weights / panels at ``STREAM_ROWS``; the kernels / torch's ops at
    ``MAX_ROWS``). A step's time jumps there (``tiny``, when the kernels took up to 32 rows: the rest of a layer
    0.22 ms at 32 rows, 0.73 at 64), so the profiler measures both sides."""
    if device.type != "cpu" or dtype not in MAX_ROWS or load() is None:
        return ()
    n = MAX_ROWS[dtype]
    return ((STREAM_ROWS, STREAM_ROWS + 1) if n > STREAM_ROWS else ()) + (n, n + 1)


def wants_panels(x: Tensor) -> bool:
    """Whether a kernel call on ``x`` ``[..., K]`` multiplies by panels when it has them."""
    return x.numel() // x.shape[-1] > STREAM_ROWS


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, residual: Tensor | None = None,
           weight_panels: Tensor | None = None) -> Tensor:
    """``residual + F.linear(x, weight, bias)`` (each rounded to x's dtype as eager ops round), ``[..., N]``.
    ``weight_panels``: ``panels(weight)``, taken by calls of more than ``STREAM_ROWS`` rows.

    NOTE: this sits on the decode path; it costs ~10 us of Python and ctypes around the kernel, so it avoids every
    avoidable tensor op."""
    N, K = weight.shape
    x = x.contiguous()
    y = x.new_empty(x.shape[:-1] + (N,))
    if residual is not None:
        residual = residual.contiguous()
    lib = _lib or _require()
    if weight_panels is not None:
        _check_panels(weight, weight_panels)
    _check(lib.xg_linear(x.data_ptr(), weight.data_ptr(), _ptr(weight_panels), _ptr(bias), _ptr(residual),
                         y.data_ptr(), DTYPES[x.dtype], x.numel() // K, K, N), "linear")
    return y


def gated(x: Tensor, w1: Tensor, w3: Tensor, act: str, b1: Tensor | None = None, b3: Tensor | None = None,
          weight_panels: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """``act(F.linear(x, w1, b1)) * F.linear(x, w3, b3)``, ``[..., N]``; ``weight_panels``: w1's and w3's."""
    p1, p3 = weight_panels or (None, None)
    if weight_panels is not None:
        _check_panels(w1, p1)
        _check_panels(w3, p3)
    N, K = w1.shape
    x = x.contiguous()
    M = x.numel() // K
    y = x.new_empty(x.shape[:-1] + (N,))
    lib = _lib or _require()
    _check(lib.xg_gated(x.data_ptr(), w1.data_ptr(), _ptr(p1), _ptr(b1), w3.data_ptr(), _ptr(p3), _ptr(b3),
                        y.data_ptr(), DTYPES[x.dtype], ACTS[act], M, K, N), "gated")
    return y


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``weight * F.rms_norm(x, eps)`` normalised in fp32, rounded as the eager module rounds."""
    K = x.shape[-1]
    x = x.contiguous()
    y = torch.empty_like(x)
    lib = _lib or _require()
    lib.xg_rmsnorm(x.data_ptr(), weight.data_ptr(), y.data_ptr(), DTYPES[x.dtype], x.numel() // K, K, eps)
    return y


def attn_decode(qkv: Tensor, cos: Tensor | None, sin: Tensor | None, pos: Tensor, rows: Tensor | slice,
                k_cache: Tensor, v_cache: Tensor, n_heads: int, n_kv_heads: int, scale: float,
                sargs: tuple | None = None) -> Tensor:
    """One decode step of attention: RoPE, the KV-cache write at ``pos``, grouped-head attention over keys
    ``0..pos`` of each row.

    Args:
        qkv: ``[n, 1, (H + 2 Hkv) D]``, the fused projection's output (model dtype).
        cos, sin: ``[1 or n, 1, 1, D]`` RoPE rows of the positions (signed sin), or None (no RoPE).
        pos: ``[n]`` int64 positions; rows: the cache rows, a slice or ``[n]`` int64.
        k_cache, v_cache: this layer's fp32 cache ``[max_rows, Hkv, max_len, D]``, contiguous.
        sargs: ``step_args(cos, sin, pos, rows)[0]`` when the caller has them (a ``Step``'s ``kernel_args``).
    Returns:
        ``[n, 1, H D]`` in the model dtype.
    """
    lib = _lib or _require()
    _alive = None
    if sargs is None:
        sargs, _alive = step_args(cos, sin, pos, rows)
    args, out, _qkv = _attn_args(qkv, sargs, k_cache, v_cache, n_heads, n_kv_heads, scale)
    _check(lib.xg_attn_decode(*args), "attn_decode")
    return out


def _attn_args(qkv: Tensor, sargs: tuple, k_cache: Tensor, v_cache: Tensor, n_heads: int, n_kv_heads: int,
               scale: float) -> tuple[tuple, Tensor, Tensor]:
    """``xg_attn_decode``'s arguments, the output they write and the contiguous ``qkv`` they read (the caller holds
    both until the call returns)."""
    n = qkv.shape[0]
    D = qkv.shape[-1] // (n_heads + 2 * n_kv_heads)
    qkv = qkv.contiguous()
    out = torch.empty(n, 1, n_heads * D, dtype=qkv.dtype)
    args = (qkv.data_ptr(), *sargs, k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[2], out.data_ptr(),
            DTYPES[qkv.dtype], n, n_heads, n_kv_heads, D, scale)
    return args, out, qkv


def attn_decode_call(qkv: Tensor, k_cache: Tensor, v_cache: Tensor, n_heads: int, n_kv_heads: int, scale: float,
                     step_arguments: tuple) -> Callable[[], int]:
    """``attn_decode`` with every argument bound and a fixed output: the core as it runs inside a fused layer's
    one call, without a separate call's Python cost (~10 us; the profiler times the core this way where the whole
    layer is fused, since the layer's call is timed with the rest of the layer). ``step_arguments``: the whole
    ``step_args`` pair (the call holds the tensors its pointers point into)."""
    lib = _lib or _require()
    args, out, qkv = _attn_args(qkv, step_arguments[0], k_cache, v_cache, n_heads, n_kv_heads, scale)
    fn, alive = lib.xg_attn_decode, (qkv, out, k_cache, v_cache, step_arguments)

    def call() -> int:
        assert alive  # the closure holds the tensors behind the pointers
        return fn(*args)

    return call


def step_args(cos: Tensor | None, sin: Tensor | None, pos: Tensor, rows: Tensor | slice) -> tuple[tuple, tuple]:
    """The arguments of a decode step that every layer shares (RoPE rows, positions, cache rows), and the tensors
    they point to: ``(cos, sin, cs_stride, pos, rows, row0)`` pointers and values."""
    row0, rows_t = (rows.start or 0, None) if isinstance(rows, slice) else (0, rows.to(torch.int64).contiguous())
    pos = pos.to(torch.int64).contiguous()
    cs_stride = 0 if cos is None or cos.shape[0] == 1 else cos.shape[-1]
    if cos is not None:
        cos, sin = cos.contiguous(), sin.contiguous()
    return (_ptr(cos), _ptr(sin), cs_stride, pos.data_ptr(), _ptr(rows_t), row0), (cos, sin, pos, rows_t)


@dataclass(frozen=True, slots=True)
class LayerPack:
    """A Llama layer's weights as ``xg_decode_layer`` takes them, gathered once (``pack_layer``): per decode step a
    fused layer then costs one ctypes call, not the ~60 us of module lookups and argument conversion of
    ``decode_layer`` (measured: 30 layers of SmolLM2 at batch 1 spent ~2.5 ms a step there)."""

    ptrs: tuple
    """norm1, wqkv, bqkv, wo, bo, norm2, w1, b1, w3, b3, w2, b2 (None: no bias)."""
    alive: tuple
    """The tensors behind ``ptrs``."""
    dtype: torch.dtype
    act: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    dim: int
    ffn: int
    eps: float
    scale: float
    panels: ctypes.Array | None = None
    """Pointers to the panels of wqkv, wo, w1, w3 and w2 (``with_panels``), or None: the calls stream the weights."""
    panels_alive: tuple = ()


def with_panels(pack: LayerPack, wqkv: Tensor, wo: Tensor, w1: Tensor, w3: Tensor, w2: Tensor) -> LayerPack:
    """``pack`` with the panels of its five Linear weights (``panels``), which its calls of more than
    ``STREAM_ROWS`` rows take."""
    ptrs = (ctypes.c_void_p * 5)(*(t.data_ptr() for t in (wqkv, wo, w1, w3, w2)))
    return replace(pack, panels=ptrs, panels_alive=(wqkv, wo, w1, w3, w2))


def pack_layer(norm1: Tensor, wqkv: Tensor, bqkv: Tensor | None, wo: Tensor, bo: Tensor | None, norm2: Tensor,
               w1: Tensor, b1: Tensor | None, w3: Tensor, b3: Tensor | None, w2: Tensor, b2: Tensor | None,
               act: str, n_heads: int, n_kv_heads: int, eps: float, scale: float) -> LayerPack:
    tensors = (norm1, wqkv, bqkv, wo, bo, norm2, w1, b1, w3, b3, w2, b2)
    return LayerPack(tuple(_ptr(t) for t in tensors), tensors, wqkv.dtype, ACTS[act], n_heads, n_kv_heads,
                     wqkv.shape[0] // (n_heads + 2 * n_kv_heads), wqkv.shape[1], w1.shape[0], eps, scale)


def decode_layer_packed(x: Tensor, pack: LayerPack, sargs: tuple, k_cache: Tensor, v_cache: Tensor, layer: int,
                        attention: bool = True) -> Tensor:
    """``decode_layer`` of layer ``layer`` of the whole caches ``[layers, rows, Hkv, max_len, D]`` (contiguous),
    with the layer's ``pack`` and the step's ``step_args``."""
    x = x.contiguous()
    out = torch.empty_like(x)
    lib = _lib or _require()
    off = layer * k_cache.stride(0) * k_cache.element_size()
    w = pack.ptrs
    _check(lib.xg_decode_layer(x.data_ptr(), out.data_ptr(), w[0], w[1], w[2], *sargs, k_cache.data_ptr() + off,
                               v_cache.data_ptr() + off, k_cache.shape[3], w[3], w[4], w[5], w[6], w[7], w[8], w[9],
                               w[10], w[11], pack.panels, DTYPES[pack.dtype], pack.act, x.shape[0], pack.dim,
                               pack.n_heads, pack.n_kv_heads, pack.head_dim, pack.ffn, pack.eps, pack.scale,
                               int(attention)),
           "decode_layer")
    return out


def decode_layer(x: Tensor, norm1: Tensor, wqkv: Tensor, bqkv: Tensor | None, cos: Tensor | None,
                 sin: Tensor | None, pos: Tensor, rows: Tensor | slice, k_cache: Tensor, v_cache: Tensor,
                 wo: Tensor, bo: Tensor | None, norm2: Tensor, w1: Tensor, b1: Tensor | None, w3: Tensor,
                 b3: Tensor | None, w2: Tensor, b2: Tensor | None, act: str, n_heads: int, n_kv_heads: int,
                 eps: float, scale: float, attention: bool = True) -> Tensor:
    """A Llama layer's decode step on one rank, ``x`` ``[n, 1, dim]`` -> ``[n, 1, dim]``: the same kernel calls
    the layer's modules make one by one (RMSNorm, wqkv, ``attn_decode``, wo + residual, RMSNorm, ``gated``,
    w2 + residual), in one call, so the same bits with ~6 fewer round trips through Python.
    ``attention=False`` leaves the attention core out (zeros in its place, the cache untouched): the rest of the
    layer, which the profiler times apart from the core. ``k_cache``/``v_cache``: this layer's ``[rows, Hkv,
    max_len, D]``."""
    pack = pack_layer(norm1, wqkv, bqkv, wo, bo, norm2, w1, b1, w3, b3, w2, b2, act, n_heads, n_kv_heads, eps, scale)
    sargs, _alive = step_args(cos, sin, pos, rows)
    return decode_layer_packed(x, pack, sargs, k_cache[None], v_cache[None], 0, attention)
