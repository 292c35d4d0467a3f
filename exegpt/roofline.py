"""Roofline profiles: kernel times of any model shape on any device, from datasheet numbers.

For GPUs the user does not own. Every kernel is ``latency + max(compute time, memory time)`` with
stated efficiencies (``Efficiency``); the numbers land within a factor ~1.5 of measurements for the
GPUs we have data for (see ``exegpt.gpu_data``, which replaces the dense and collective parts with
measurements where they exist). All times are seconds for one layer on one rank of a TP group.

Formulas (``db`` = dtype bytes, ``h``/``kvh`` = query/KV heads per rank, ``hd`` = head width):

* GEMM ``[M, k] @ [k, n]``: ``lat + max(2 M k n / (e_c peak), db (k n + M (k + n)) / (e_m bw))``;
* element-wise op (norm, RoPE, activation, residual add): ``lat + M bytes_per_token / (e_m bw)``;
* a layer is the sum of its ops (``layer_ops``): QKV, O, MLP GEMMs sharded over ``tp``; norms and
  adds on the full width. dense_encode == dense_decode for decoder-only models. T5: dense_encode is
  an encoder layer plus its share (D/E) of the decoder's cross-attention K/V projection of the
  encoder output; dense_decode is a decoder layer (self + cross Q/O projections, three norms/adds);
* attn_encode(b, s): ``lat + max(4 b h hd s^2 c / (e_ac peak), db b s (2 h + 4 kvh) hd / (e_m bw))``,
  ``c`` = 1/2 for causal prefill, 1 for a T5 encoder (bidirectional); reads Q, K, V, writes O and K, V;
* attn_decode(b, ctx): ``lat + max(4 b h hd ctx / (e_ac peak), b ctx kv_bytes_per_token / (e_am bw))``;
  attn_cross likewise over the input tokens' cross K/V;
* lm_head(M), whole model at tp=1: embedding gather + final norm + ``[M, dim] @ [dim, vocab]`` +
  sampling (softmax / argmax reading the logits twice);
* allreduce (ring, ``p`` ranks): ``2 (p-1) lat_link + 2 (p-1)/p bytes / (e_link link_bw)`` (inter-node
  bandwidth when ``p`` exceeds the node size); send_recv: ``lat_link + bytes / (e_link link_bw)``;
  kv_handoff (device -> host -> device): ``2 (lat_link + bytes / (e_host host_bw))``.

An ``fp8`` model (W8A8, as vLLM serves an FP8 checkpoint) runs its GEMMs at the device's FP8 peak
(``DeviceSpec.fp8_flops``; none on a device without FP8 tensor cores: one line) on 1-byte weights and inputs;
attention, its q/k/v/o traffic and the collectives' messages stay bf16 (``ModelShape.activation_dtype_bytes``),
and the KV cache is the shape's ``kv_dtype``. Norms and residual adds are priced at 1 byte an element (a few
per cent of a layer's time at most).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np

from .devices import DEVICES, DeviceSpec, get_device
from .errors import ExeGPTError
from .models import ModelShape, get_model
from .profile import Kernel, Profile, ProfileTable, today

DEFAULT_TP = (1, 2, 4, 8)
DEFAULT_STEP_OVERHEAD_S = 5e-4
"""Engine cost per iteration outside the kernels (scheduling, launches, host sync); assumed."""
MAX_BATCH = 1024
MAX_TOKENS = 65536
MAX_BYTES = 4 * 1024 ** 3


@dataclass(frozen=True, slots=True)
class Efficiency:
    """Fractions of datasheet rates that real kernels reach, and fixed latencies (assumed; the defaults
    match the shipped A100/H100/A40 GEMM measurements to ~10% at large sizes)."""

    compute: float = 0.7
    """GEMM FLOP/s / peak (cuBLAS fp16 on A100/H100/A40 reaches 0.71-0.76 at 4096 tokens)."""
    memory: float = 0.75
    """Streaming bandwidth / datasheet bandwidth (weight-bound GEMMs measure 0.74-0.80)."""
    attn_compute: float = 0.45
    """Flash-attention prefill FLOP/s / peak."""
    attn_memory: float = 0.6
    """Decode attention (paged / flash-decode) KV read bandwidth / datasheet bandwidth."""
    link: float = 0.75
    """Collective bus bandwidth / link bandwidth."""
    host: float = 0.7
    """Device <-> host copy bandwidth / datasheet host bandwidth."""
    kernel_latency_s: float = 4e-6
    """Fixed cost of one kernel (launch and tail)."""
    link_latency_s: float = 3e-6
    """Fixed cost of one ring step / one transfer."""

    def __post_init__(self):
        for f in ("compute", "memory", "attn_compute", "attn_memory", "link", "host"):
            v = getattr(self, f)
            if not (0 < v <= 1):
                raise ExeGPTError(f"efficiency {f}={v!r} must be in (0, 1]")
        for f in ("kernel_latency_s", "link_latency_s"):
            v = getattr(self, f)
            if not (np.isfinite(v) and v >= 0):
                raise ExeGPTError(f"efficiency {f}={v!r} must be >= 0")


# --- layer decomposition (shared with gpu_data) -----------------------------------------------


@dataclass(frozen=True, slots=True)
class Gemm:
    """``[M, k] @ [k, n]`` per rank, ``count`` times per layer."""

    name: str
    k: int
    n: int
    count: float = 1.0


@dataclass(frozen=True, slots=True)
class Elementwise:
    """A memory-bound op moving ``bytes_per_token`` per token; ``kind`` names its measured analogue."""

    name: str
    kind: str
    """'norm', 'rope', 'act', 'add', 'emb' or 'sample'."""
    bytes_per_token: float
    count: float = 1.0


Op = Gemm | Elementwise


def layer_ops(model: ModelShape, tp: int, part: str) -> tuple[Op, ...]:
    """The token-level ops of one layer on one rank: ``part`` is 'encode' or 'decode' (see module doc)."""
    if part not in ("encode", "decode"):
        raise ExeGPTError(f"part {part!r} must be 'encode' or 'decode'")
    d, db, hd = model.dim, model.dtype_bytes, model.hd
    q, kv = model.n_heads * hd // tp, model.n_kv_heads * hd // tp
    ffn = model.ffn_dim // tp
    ops: list[Op] = [Elementwise("attn_norm", "norm", 2 * d * db), Gemm("qkv_proj", d, q + 2 * kv)]
    if model.family == "llama":
        ops.append(Elementwise("rope", "rope", 2 * (q + kv) * db))
    ops += [Gemm("o_proj", q, d), Elementwise("attn_add", "add", 3 * d * db)]
    if model.is_encoder_decoder and part == "decode":
        ops += [Elementwise("cross_norm", "norm", 2 * d * db), Gemm("cross_q_proj", d, q),
                Gemm("cross_o_proj", q, d), Elementwise("cross_add", "add", 3 * d * db)]
    if model.is_encoder_decoder and part == "encode":
        # The decoder's cross K/V of the encoder output: once per input token per decoder layer.
        ops.append(Gemm("cross_kv_proj", d, 2 * q, count=model.n_layers / model.n_encoder_layers))
    up = 2 * ffn if model.gated_mlp else ffn
    ops += [Elementwise("mlp_norm", "norm", 2 * d * db), Gemm("mlp_up_proj", d, up),
            Elementwise("mlp_act", "act", (up + ffn) * db), Gemm("mlp_down_proj", ffn, d),
            Elementwise("mlp_add", "add", 3 * d * db)]
    return tuple(ops)


def lm_head_ops(model: ModelShape) -> tuple[Op, ...]:
    """Embedding + final norm + LM head + sampling of the whole model (tp=1)."""
    d, db, v = model.dim, model.dtype_bytes, model.vocab_size
    return (Elementwise("embedding", "emb", 2 * d * db), Elementwise("final_norm", "norm", 2 * d * db),
            Gemm("lm_head", d, v), Elementwise("sampling", "sample", 2 * v * db))


def gemm_flops(device: DeviceSpec, dtype_bytes: int) -> float:
    """The GEMM peak of a ``dtype_bytes`` model: FP8's (1 byte) where the device has FP8 tensor cores."""
    if dtype_bytes != 1:
        return device.peak_flops
    if not device.fp8_flops > 0:
        raise ExeGPTError(f"device {device.name} has no FP8 tensor cores (fp8_flops unset); an fp8 model needs one")
    return device.fp8_flops


def op_seconds(op: Op, tokens, device: DeviceSpec, eff: Efficiency, dtype_bytes: int) -> np.ndarray:
    m = np.asarray(tokens, dtype=float)
    bw = eff.memory * device.mem_bw_bytes_s
    if isinstance(op, Gemm):
        compute = 2 * m * op.k * op.n / (eff.compute * gemm_flops(device, dtype_bytes))
        memory = dtype_bytes * (op.k * op.n + m * (op.k + op.n)) / bw
        t = np.maximum(compute, memory)
    else:
        t = m * op.bytes_per_token / bw
    return op.count * (eff.kernel_latency_s + t)


def ops_seconds(ops, tokens, device, eff, dtype_bytes) -> np.ndarray:
    return sum(op_seconds(op, tokens, device, eff, dtype_bytes) for op in ops)


# --- attention ---------------------------------------------------------------------------------


def attn_encode_seconds(model: ModelShape, device: DeviceSpec, tp: int, batch, seq, eff: Efficiency):
    b, s = np.asarray(batch, dtype=float), np.asarray(seq, dtype=float)
    h, kvh, hd, db = model.n_heads / tp, model.n_kv_heads / tp, model.hd, model.activation_dtype_bytes
    causal = 1.0 if model.is_encoder_decoder else 0.5  # T5's encoder attends both ways
    flops = 4 * b * h * hd * s * s * causal
    moved = db * b * s * (2 * h + 4 * kvh) * hd
    return eff.kernel_latency_s + np.maximum(flops / (eff.attn_compute * device.peak_flops),
                                             moved / (eff.memory * device.mem_bw_bytes_s))


def _attn_step_seconds(model, device, tp, batch, context, eff, kv_bytes_per_token):
    b, c = np.asarray(batch, dtype=float), np.asarray(context, dtype=float)
    h, hd, db = model.n_heads / tp, model.hd, model.activation_dtype_bytes
    flops = 4 * b * h * hd * c
    moved = b * c * kv_bytes_per_token + db * b * 2 * h * hd
    return eff.kernel_latency_s + np.maximum(flops / (eff.attn_compute * device.peak_flops),
                                             moved / (eff.attn_memory * device.mem_bw_bytes_s))


def attn_decode_seconds(model, device, tp, batch, context, eff):
    return _attn_step_seconds(model, device, tp, batch, context, eff, model.kv_bytes_per_token(tp))


def attn_cross_seconds(model, device, tp, batch, context, eff):
    return _attn_step_seconds(model, device, tp, batch, context, eff, model.cross_kv_bytes_per_token(tp))


# --- communication -----------------------------------------------------------------------------


def ring_allreduce_seconds(nbytes, ranks: int, bw_bytes_s: float, latency_s: float):
    x = np.asarray(nbytes, dtype=float)
    return 2 * (ranks - 1) * latency_s + 2 * (ranks - 1) / ranks * x / bw_bytes_s


def allreduce_seconds(nbytes, tp: int, device: DeviceSpec, eff: Efficiency):
    link = device.link_bw_bytes_s if tp <= device.node_size else device.internode_bw_bytes_s
    return ring_allreduce_seconds(nbytes, tp, eff.link * link, eff.link_latency_s)


def send_recv_seconds(nbytes, device: DeviceSpec, eff: Efficiency):
    return eff.link_latency_s + np.asarray(nbytes, dtype=float) / (eff.link * device.link_bw_bytes_s)


def kv_handoff_seconds(nbytes, device: DeviceSpec, eff: Efficiency):
    return 2 * (eff.link_latency_s + np.asarray(nbytes, dtype=float) / (eff.host * device.host_bw_bytes_s))


# --- grids and helpers -------------------------------------------------------------------------


def size_grid(lo: float, hi: float) -> tuple[float, ...]:
    """1, 2, 3, 4, 6, 8, 12, 16, ... (powers of two and 1.5x them) within [lo, hi], ``hi`` included:
    dense at small sizes, sparse at large ones (linear interpolation of s^2 errs < 4%)."""
    pts = {1.0, 2.0, 3.0}
    k = 2.0
    while k <= hi:
        pts.update((k, 1.5 * k))
        k *= 2
    return tuple(sorted(p for p in pts if lo <= p < hi) + [float(hi)])


def resolve_tp(model: ModelShape, tp_degrees) -> tuple[int, ...]:
    """``None``: the degrees of (1, 2, 4, 8) that ``model`` supports. Explicit degrees must all be valid;
    1 is always included (a profile needs its tp=1 tables)."""
    if tp_degrees is None:
        return tuple(t for t in DEFAULT_TP if model.valid_tp(t))
    out = {1}
    for t in tp_degrees:
        if isinstance(t, bool) or int(t) != t or t < 1:
            raise ExeGPTError(f"tp degree {t!r} must be an integer >= 1")
        if not model.valid_tp(int(t)):
            valid = [x for x in range(1, model.n_heads + 1) if model.valid_tp(x)]
            raise ExeGPTError(f"tp={t} does not divide the {model.n_heads} query / {model.n_kv_heads} KV heads "
                              f"of {model.name}; valid degrees: {', '.join(map(str, valid))}")
        out.add(int(t))
    return tuple(sorted(out))


def table(kernel: Kernel, tp: int, xs, seconds, ys=(), extrapolate=False) -> ProfileTable:
    s = np.asarray(seconds, dtype=float)
    return ProfileTable(kernel=kernel, tp=tp, xs=tuple(float(x) for x in xs), ys=tuple(float(y) for y in ys),
                        seconds=tuple(map(tuple, s)) if s.ndim == 2 else tuple(s.tolist()),
                        extrapolate=extrapolate)


def attention_tables(model: ModelShape, device: DeviceSpec, tps, eff: Efficiency) -> list[ProfileTable]:
    """attn_encode (batch x seq), attn_decode and attn_cross (batch x context) at every degree."""
    batch = np.asarray(size_grid(1, MAX_BATCH))
    seq = np.asarray(size_grid(1, model.max_seq_len))
    b, s = np.meshgrid(batch, seq, indexing="ij")
    out = []
    for tp in tps:
        out.append(table(Kernel.ATTN_ENCODE, tp, batch, attn_encode_seconds(model, device, tp, b, s, eff), seq))
        # Decode-step attention is linear in rows and context: extending the last segment is exact.
        out.append(table(Kernel.ATTN_DECODE, tp, batch, attn_decode_seconds(model, device, tp, b, s, eff), seq,
                         extrapolate=True))
        if model.is_encoder_decoder:
            out.append(table(Kernel.ATTN_CROSS, tp, batch, attn_cross_seconds(model, device, tp, b, s, eff), seq,
                             extrapolate=True))
    return out


def device_facts(device: DeviceSpec) -> dict:
    return {f: getattr(device, f) for f in DeviceSpec.__slots__}


# --- the profile -------------------------------------------------------------------------------


def roofline_profile(model: ModelShape | str, device: DeviceSpec | str, tp_degrees=None,
                     efficiency: Efficiency = Efficiency(),
                     step_overhead_s: float = DEFAULT_STEP_OVERHEAD_S) -> Profile:
    """A modelled ``Profile`` (source='roofline') of ``model`` on ``device`` at the TP degrees of
    ``tp_degrees`` (default: those of 1, 2, 4, 8 that divide the model's heads). Cached per arguments."""
    model, device = get_model(model), get_device(device)
    if not isinstance(efficiency, Efficiency):
        raise ExeGPTError(f"efficiency must be an Efficiency, got {type(efficiency).__name__}")
    if not (np.isfinite(step_overhead_s) and step_overhead_s >= 0):
        raise ExeGPTError(f"step_overhead_s={step_overhead_s!r} must be >= 0")
    return _roofline_profile(model, device, resolve_tp(model, tp_degrees), efficiency, float(step_overhead_s))


@lru_cache(maxsize=64)
def _roofline_profile(model, device, tps, eff, step_overhead_s) -> Profile:
    tokens = np.asarray(size_grid(1, MAX_TOKENS))
    nbytes = np.asarray(size_grid(1, MAX_BYTES))
    db = model.dtype_bytes
    tables = attention_tables(model, device, tps, eff)
    for tp in tps:
        for kernel, part in ((Kernel.DENSE_ENCODE, "encode"), (Kernel.DENSE_DECODE, "decode")):
            t = ops_seconds(layer_ops(model, tp, part), tokens, device, eff, db)
            tables.append(table(kernel, tp, tokens, t, extrapolate=True))
        if tp > 1:
            tables.append(table(Kernel.ALLREDUCE, tp, nbytes, allreduce_seconds(nbytes, tp, device, eff),
                                extrapolate=True))
    tables += [table(Kernel.LM_HEAD, 1, tokens, ops_seconds(lm_head_ops(model), tokens, device, eff, db),
                     extrapolate=True),
               table(Kernel.SEND_RECV, 1, nbytes, send_recv_seconds(nbytes, device, eff), extrapolate=True),
               table(Kernel.KV_HANDOFF, 1, nbytes, kv_handoff_seconds(nbytes, device, eff), extrapolate=True)]
    provenance = {
        "generator": "exegpt.roofline", "date": today(), "tp_degrees": list(tps),
        "device": device_facts(device), "efficiency": asdict(eff), "step_overhead_s": step_overhead_s,
        "formulas": "see exegpt/roofline.py module docstring: GEMM/element-wise ops lat + max(compute, memory); "
                    "attention encode causal FLOPs, decode KV bytes; ring all-reduce; kv_handoff via host",
    }
    return Profile(model=model.name, device=device.name, tables=tuple(tables), dtype=model.dtype,
                   kv_dtype=model.kv_dtype or None, step_overhead_s=step_overhead_s, source="roofline",
                   device_memory_bytes=None if device.name in DEVICES else device.memory_bytes,
                   provenance=provenance)
