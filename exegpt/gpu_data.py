"""Profiles of A100 / H100 / A40 GPUs from shipped measurements (Vidur's, see data/ATTRIBUTION.md).

``gpu_profile(model, device)`` builds a ``Profile`` (source='gpu-data') without owning the GPU:

* **dense** (the token-level rest of a layer): for a measured model (llama-2-7b, llama-2-70b,
  codellama-34b) the measured per-layer sums at TP 1, 2, 4, 8 (1..4096 tokens), extended to 65536
  tokens by the calibrated model below scaled to the measurements at >= 2048 tokens. For any other
  shape, a **calibrated model** fitted per GPU on all measured ops of the three models and four TP
  degrees: a GEMM ``[M, k] @ [k, n]`` takes ``lat + (t_c^a + t_m^a)^(1/a)``, ``t_c = 2 ceil(M/64) 64 k n / P``
  (tile quantisation), ``t_m = db (k n + M (k + n)) / B``; each element-wise kind (norm, rope, act,
  add, emb) ``lat_kind + M bytes_per_token / B_kind``. The layer is ``roofline.layer_ops`` of the shape.
  The fit error on a held-out measured model is in ``provenance['calibration']['holdout']``;
* **attention**: the roofline (``roofline.Efficiency``), as the data has no attention kernels;
* **lm_head**: the calibrated model over ``roofline.lm_head_ops`` (sampling as an 'act' op);
* **allreduce / send_recv**: measured on the GPU's topology (a100_dgx, h100_dgx, a40_pairwise_nvlink),
  smoothed, extended linearly beyond 64 MiB. Degrees not measured (all of them on the A40, which has
  send/recv only) use the ring model with the latency and bandwidth fitted to the measured send/recv;
* **kv_handoff**: the roofline (host bandwidth).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy.optimize import least_squares

from .devices import DeviceSpec, get_device
from .errors import ExeGPTError
from .models import ModelShape, get_model
from .profile import Kernel, Profile, ProfileTable, today
from .roofline import (DEFAULT_STEP_OVERHEAD_S, MAX_BYTES, MAX_TOKENS, Efficiency, Elementwise, Gemm,
                       attention_tables, device_facts, kv_handoff_seconds, layer_ops, lm_head_ops, resolve_tp,
                       ring_allreduce_seconds, roofline_profile, size_grid, table)

DATA_DIR = Path(__file__).parent / "data" / "gpu"
GPUS = {"A100": "a100", "H100": "h100", "A40": "a40"}
TOPOLOGY = {"a100": "a100_dgx", "h100": "h100_dgx", "a40": "a40_pairwise_nvlink"}
MEASURED_MODELS = ("llama-2-7b", "llama-2-70b", "codellama-34b")
MEASURED_TP = (1, 2, 4, 8)
TILE_M = 64
EXTEND_FROM_TOKENS = 2048
# Vidur's element-wise op name -> the kind it calibrates (bytes per token: _elementwise_bytes)
_ELEMENTWISE = {"input_layernorm": "norm", "post_attention_layernorm": "norm", "attn_rope": "rope",
                "mlp_act": "act", "add": "add", "emb": "emb"}
_GEMMS = ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj")
_KIND_OF = {"sample": "act"}  # sampling reads the logits like an activation does


# --- data --------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def load_gpu(gpu: str) -> dict:
    """The derived measurements of one GPU ('a100', 'h100', 'a40'); see exegpt/data/derive_gpu_data.py."""
    with gzip.open(DATA_DIR / f"{gpu}.json.gz", "rt") as f:
        return json.load(f)


@lru_cache(maxsize=None)
def load_network() -> dict:
    with gzip.open(DATA_DIR / "network.json.gz", "rt") as f:
        return json.load(f)


@lru_cache(maxsize=None)
def fit_validation() -> dict:
    """Held-out errors of the calibrated model, written by ``exegpt/data/derive_gpu_data.py``."""
    path = DATA_DIR / "fit_validation.json"
    return json.loads(path.read_text()) if path.exists() else {}


def gpu_key(device: DeviceSpec | str) -> str:
    device = get_device(device)
    key = GPUS.get(device.name.upper())
    if key is None:
        raise ExeGPTError(f"no shipped measurements for device {device.name!r}; have {', '.join(GPUS)} "
                          f"(use exegpt.roofline.roofline_profile for others)")
    return key


def _gemm_shapes(model: ModelShape, tp: int) -> dict[str, tuple[int, int]]:
    """Vidur's four linear ops of a Llama layer as (k, n) per rank."""
    hd = model.hd
    q, kv, ffn = model.n_heads * hd // tp, model.n_kv_heads * hd // tp, model.ffn_dim // tp
    return {"attn_pre_proj": (model.dim, q + 2 * kv), "attn_post_proj": (q, model.dim),
            "mlp_up_proj": (model.dim, 2 * ffn), "mlp_down_proj": (ffn, model.dim)}


def _elementwise_bytes(model: ModelShape, tp: int) -> dict[str, float]:
    by_name = {op.name: op.bytes_per_token for op in layer_ops(model, tp, "decode") if isinstance(op, Elementwise)}
    d, db = model.dim, model.dtype_bytes
    return {"input_layernorm": by_name["attn_norm"], "post_attention_layernorm": by_name["mlp_norm"],
            "attn_rope": by_name["rope"], "mlp_act": by_name["mlp_act"], "add": by_name["mlp_add"],
            "emb": 2 * d * db}


def measured_points(gpu: str, models=MEASURED_MODELS):
    """(gemm rows, element-wise rows): arrays of (M, k, n, seconds) and (kind, M, bytes/token, seconds)."""
    data = load_gpu(gpu)["models"]
    gemm, elem = [], []
    for name in models:
        shape = get_model(name)
        for tp_s, d in data[name]["tp"].items():
            tp, m = int(tp_s), np.asarray(d["num_tokens"], dtype=float)
            for op, (k, n) in _gemm_shapes(shape, tp).items():
                gemm.append(np.column_stack([m, np.full_like(m, k), np.full_like(m, n), d["ops"][op]]))
            for op, nbytes in _elementwise_bytes(shape, tp).items():
                elem.append((_ELEMENTWISE[op], m, nbytes, np.asarray(d["ops"][op])))
    return np.concatenate(gemm), elem


# --- calibrated model --------------------------------------------------------------------------


def _gemm_model(p, m, k, n, db=2):
    lat, log_p, log_b, a = p
    compute = 2 * np.ceil(m / TILE_M) * TILE_M * k * n / np.exp(log_p)
    memory = db * (k * n + m * (k + n)) / np.exp(log_b)
    return lat * 1e-6 + (compute ** a + memory ** a) ** (1 / a)


@dataclass(frozen=True)
class Calibration:
    """Per-GPU fitted rates: GEMM (lat_us, log peak FLOP/s, log bandwidth, blend exponent) and, per
    element-wise kind, (lat_us, log bandwidth)."""

    gpu: str
    gemm: tuple[float, float, float, float]
    elementwise: dict
    fitted_on: tuple[str, ...]
    in_sample_rel_err: dict

    def op_seconds(self, op, tokens, dtype_bytes: int = 2):
        m = np.asarray(tokens, dtype=float)
        if isinstance(op, Gemm):
            return op.count * _gemm_model(self.gemm, m, op.k, op.n, dtype_bytes)
        lat, log_b = self.elementwise[_KIND_OF.get(op.kind, op.kind)]
        return op.count * (lat * 1e-6 + m * op.bytes_per_token / np.exp(log_b))

    def ops_seconds(self, ops, tokens, dtype_bytes: int = 2):
        return sum(self.op_seconds(op, tokens, dtype_bytes) for op in ops)

    def layer_seconds(self, model: ModelShape, tp: int, tokens, part: str = "decode"):
        return self.ops_seconds(layer_ops(model, tp, part), tokens, model.dtype_bytes)

    def summary(self) -> dict:
        lat, log_p, log_b, a = self.gemm
        return {"gemm": {"latency_s": lat * 1e-6, "peak_flops": float(np.exp(log_p)),
                         "bandwidth_bytes_s": float(np.exp(log_b)), "blend_exponent": a, "tile_m": TILE_M},
                "elementwise": {k: {"latency_s": v[0] * 1e-6, "bandwidth_bytes_s": float(np.exp(v[1]))}
                                for k, v in self.elementwise.items()},
                "fitted_on": list(self.fitted_on), "in_sample_rel_err": self.in_sample_rel_err}


@lru_cache(maxsize=None)
def calibrate(gpu: str, exclude: tuple[str, ...] = ()) -> Calibration:
    """Least-squares fit (log-time residuals) of the calibrated model to every measured op of ``gpu``,
    leaving out the models in ``exclude``."""
    models = tuple(m for m in MEASURED_MODELS if m not in exclude)
    if not models:
        raise ExeGPTError("calibration needs at least one measured model")
    g, elem = measured_points(gpu, models)
    m, k, n, t = g.T
    # Unconstrained parameters (Levenberg-Marquardt is ~3x faster than bounded TRF here):
    # lat_us = exp(q0), exponent a = 1 + exp(q3) > 1.
    def params(q):
        return float(np.exp(q[0])), float(q[1]), float(q[2]), float(1 + np.exp(q[3]))

    log_t = np.log(t)
    fit = least_squares(lambda q: np.log(_gemm_model(params(q), m, k, n)) - log_t,
                        [np.log(5.0), np.log(200e12), np.log(1.5e12), np.log(0.5)], method="lm")
    gemm = params(fit.x)
    gemm_err = np.abs(_gemm_model(gemm, m, k, n) / t - 1)
    kinds = {}
    for kind in sorted({e[0] for e in elem}):
        rows = [e for e in elem if e[0] == kind]
        mm = np.concatenate([r[1] for r in rows])
        bb = np.concatenate([np.full_like(r[1], r[2]) for r in rows])
        tt = np.maximum(np.concatenate([r[3] for r in rows]), 1e-7)
        log_tt = np.log(tt)
        f = least_squares(lambda q: np.log(np.exp(q[0]) * 1e-6 + mm * bb / np.exp(q[1])) - log_tt,
                          [np.log(3.0), np.log(1e12)], method="lm")
        kinds[kind] = (float(np.exp(f.x[0])), float(f.x[1]))
    err = {"gemm_median": round(float(np.median(gemm_err)), 4),
           "gemm_p90": round(float(np.percentile(gemm_err, 90)), 4), "gemm_points": int(len(t))}
    return Calibration(gpu, gemm, kinds, models, err)


def holdout_error(gpu: str, held_out: str) -> dict:
    """Relative error of the per-layer dense time of ``held_out`` predicted by a calibration fitted
    without it, over all its measured (tp, num_tokens): median, p90, max."""
    cal = calibrate(gpu, exclude=(held_out,))
    shape = get_model(held_out)
    errs = []
    for tp_s, d in load_gpu(gpu)["models"][held_out]["tp"].items():
        pred = cal.layer_seconds(shape, int(tp_s), d["num_tokens"])
        errs.append(np.abs(pred / np.asarray(d["layer_s"]) - 1))
    e = np.concatenate(errs)
    return {"median": round(float(np.median(e)), 4), "p90": round(float(np.percentile(e, 90)), 4),
            "max": round(float(e.max()), 4), "points": int(e.size)}


# --- network -----------------------------------------------------------------------------------


def _series(entries, **key):
    for e in entries:
        if all(e[k] == v for k, v in key.items()):
            return np.asarray(e["bytes"], dtype=float), np.asarray(e["seconds"], dtype=float)
    return None


def smooth_series(sizes, seconds, grid) -> np.ndarray:
    """Measured times on ``grid``: local median within +-20% inside the measured range, the first
    measurement below it, and a linear fit of the top quarter of the range (continuous) above it."""
    out = np.empty(len(grid))
    top = sizes >= sizes[-1] / 4
    slope = max(float(np.polyfit(sizes[top], seconds[top], 1)[0]), 0.0)
    for i, g in enumerate(grid):
        if g <= sizes[0]:
            out[i] = seconds[0]
        elif g >= sizes[-1]:
            out[i] = np.median(seconds[sizes >= sizes[-1] / 1.2]) + slope * (g - sizes[-1])
        else:
            near = (sizes >= g / 1.2) & (sizes <= g * 1.2)
            out[i] = np.median(seconds[near]) if near.any() else np.interp(g, sizes, seconds)
    return out


def fit_link(sizes, seconds) -> tuple[float, float]:
    """(latency_s, bandwidth_bytes_s) of ``t = lat + bytes / bw`` fitted to a send/recv series."""
    log_t = np.log(seconds)
    f = least_squares(lambda q: np.log(np.exp(q[0]) * 1e-6 + sizes / np.exp(q[1])) - log_t,
                      [np.log(10.0), np.log(1e10)], method="lm")
    return float(np.exp(f.x[0]) * 1e-6), float(np.exp(f.x[1]))


def network_tables(gpu: str, tps, topology: str | None = None) -> tuple[list[ProfileTable], dict]:
    topology = topology or TOPOLOGY[gpu]
    topo = load_network()["topologies"].get(topology)
    if topo is None:
        raise ExeGPTError(f"unknown topology {topology!r}; have {', '.join(load_network()['topologies'])}")
    grid = np.asarray(size_grid(1, MAX_BYTES))
    sizes, secs = _series(topo["send_recv"], devices_per_node=2)
    lat, bw = fit_link(sizes, secs)
    tables = [table(Kernel.SEND_RECV, 1, grid, smooth_series(sizes, secs, grid), extrapolate=True)]
    how = {"topology": topology, "send_recv": "measured (intra-node)",
           "send_recv_fit": {"latency_s": lat, "bandwidth_bytes_s": bw}}
    for tp in tps:
        if tp == 1:
            continue
        measured = _series(topo.get("all_reduce", []), num_workers=tp, devices_per_node=tp)
        if measured is not None:
            t = smooth_series(*measured, grid)
            how[f"allreduce_tp{tp}"] = "measured (intra-node)"
        else:
            t = ring_allreduce_seconds(grid, tp, bw, lat)
            how[f"allreduce_tp{tp}"] = "ring model 2(p-1) lat + 2(p-1)/p bytes / bw on the send_recv fit"
        tables.append(table(Kernel.ALLREDUCE, tp, grid, t, extrapolate=True))
    return tables, how


# --- the profile -------------------------------------------------------------------------------


def gpu_profile(model: ModelShape | str, device: DeviceSpec | str, tp_degrees=None, *,
                efficiency: Efficiency = Efficiency(), step_overhead_s: float = DEFAULT_STEP_OVERHEAD_S,
                topology: str | None = None) -> Profile:
    """A ``Profile`` (source='gpu-data') of ``model`` on an A100, H100 or A40 (see module doc), at the
    TP degrees of ``tp_degrees`` (default: those of 1, 2, 4, 8 the model supports). Cached."""
    model, device = get_model(model), get_device(device)
    gpu = gpu_key(device)
    if model.dtype not in ("fp16", "bf16"):
        raise ExeGPTError(f"the {device.name} measurements are fp16; {model.name} is {model.dtype} "
                          f"(use exegpt.roofline.roofline_profile)")
    tps = resolve_tp(model, tp_degrees)
    if max(tps) > max(MEASURED_TP):
        raise ExeGPTError(f"tp={max(tps)} exceeds the measured degrees {MEASURED_TP} of the {device.name} data")
    if not isinstance(efficiency, Efficiency):
        raise ExeGPTError(f"efficiency must be an Efficiency, got {type(efficiency).__name__}")
    return _gpu_profile(model, device, gpu, tps, efficiency, float(step_overhead_s), topology)


@lru_cache(maxsize=64)
def _gpu_profile(model, device, gpu, tps, eff, step_overhead_s, topology) -> Profile:
    cal = calibrate(gpu)
    measured = model.name in MEASURED_MODELS and get_model(model.name) == model
    tables = attention_tables(model, device, tps, eff)
    grid = np.asarray(size_grid(1, MAX_TOKENS))
    for tp in tps:
        if measured:
            d = load_gpu(gpu)["models"][model.name]["tp"][str(tp)]
            xs, ys = np.asarray(d["num_tokens"], dtype=float), np.asarray(d["layer_s"])
            top = xs >= EXTEND_FROM_TOKENS
            scale = np.median(ys[top] / cal.layer_seconds(model, tp, xs[top]))
            ext = grid[grid > xs[-1]]
            xs, ys = np.concatenate([xs, ext]), np.concatenate([ys, scale * cal.layer_seconds(model, tp, ext)])
            enc = dec = ys
        else:
            xs = grid
            enc, dec = (cal.layer_seconds(model, tp, grid, part) for part in ("encode", "decode"))
        tables += [table(Kernel.DENSE_ENCODE, tp, xs, enc, extrapolate=True),
                   table(Kernel.DENSE_DECODE, tp, xs, dec, extrapolate=True)]
    tables.append(table(Kernel.LM_HEAD, 1, grid, cal.ops_seconds(lm_head_ops(model), grid, model.dtype_bytes),
                        extrapolate=True))
    net, net_how = network_tables(gpu, tps, topology)
    nbytes = np.asarray(size_grid(1, MAX_BYTES))
    tables += net + [table(Kernel.KV_HANDOFF, 1, nbytes, kv_handoff_seconds(nbytes, device, eff), extrapolate=True)]
    provenance = {
        "generator": "exegpt.gpu_data", "date": today(), "tp_degrees": list(tps),
        "data": "Vidur (microsoft/vidur, MIT) measurements; see exegpt/data/ATTRIBUTION.md",
        "dense": (f"measured per-layer sums of {model.name} (1..4096 tokens), extended by the calibrated "
                  f"model scaled to the measurements at >= {EXTEND_FROM_TOKENS} tokens") if measured
        else f"calibrated model of the {device.name} data applied to the shape of {model.name}",
        "calibration": {**cal.summary(), "holdout": fit_validation().get(gpu, {})},
        "attention": "roofline (exegpt.roofline) with the efficiencies below",
        "lm_head": "calibrated model over embedding + final norm + LM head GEMM + sampling",
        "network": net_how, "kv_handoff": "roofline via host bandwidth",
        "device": device_facts(device), "efficiency": asdict(eff), "step_overhead_s": step_overhead_s,
    }
    return Profile(model=model.name, device=device.name, tables=tuple(tables), dtype=model.dtype,
                   step_overhead_s=step_overhead_s, source="gpu-data", provenance=provenance)


def builtin_profile(model: ModelShape | str, device_name: DeviceSpec | str, tp_degrees=None) -> Profile:
    """The best profile without measuring: the one ``python -m profiler`` measured on the device, where the
    project ships it (``shipped_profile``), with the collectives it could not measure (one GPU has no peer)
    modelled as below; else ``gpu_profile`` where the device has shipped data and the model is 16-bit; else
    ``roofline_profile``."""
    model, device = get_model(model), get_device(device_name)
    shipped = shipped_profile(model, device)
    if shipped is not None:
        return _with_network(shipped, model, device)
    return _modelled_profile(model, device, tp_degrees)


def _modelled_profile(model: ModelShape, device: DeviceSpec, tp_degrees) -> Profile:
    if device.name.upper() in GPUS and model.dtype in ("fp16", "bf16"):
        return gpu_profile(model, device, tp_degrees)
    return roofline_profile(model, device, tp_degrees)


PROFILES_DIR = Path(__file__).parent / "data" / "profiles"
"""Profiles measured with ``python -m profiler`` and shipped with the package, ``<model>-<device>.json`` (lower
case; each with its provenance: device facts, torch, date, grid)."""
NETWORK = (Kernel.ALLREDUCE, Kernel.SEND_RECV, Kernel.KV_HANDOFF)


def shipped_profile(model: ModelShape | str, device: DeviceSpec | str) -> Profile | None:
    """The measured profile of ``model`` on ``device`` in ``PROFILES_DIR``, or None when none is shipped."""
    model, device = get_model(model), get_device(device)
    path = PROFILES_DIR / f"{model.name}-{device.name}.json".lower()
    if not path.is_file():
        return None
    prof = _load_shipped(path, path.stat().st_mtime_ns)
    if prof.model.lower() != model.name.lower() or prof.device.lower() != device.name.lower():
        raise ExeGPTError(f"shipped profile {path.name} holds {prof.model} on {prof.device}, not {model.name} on "
                          f"{device.name}")
    return prof


@lru_cache(maxsize=16)
def _load_shipped(path: Path, mtime_ns: int) -> Profile:
    return Profile.load(path)


def _with_network(prof: Profile, model: ModelShape, device: DeviceSpec) -> Profile:
    """``prof`` plus the modelled tables (``_modelled_profile`` at ``prof``'s TP degrees) of the collectives it
    lacks: all-reduce at each of its TP degrees above 1, send/recv and the KV hand-off. Their source is recorded
    in the provenance's ``modelled_tables``."""
    have = {(t.kernel, t.tp) for t in prof.tables}
    tps = prof.tp_degrees()
    base = _modelled_profile(model, device, tps)
    fill = tuple(t for t in base.tables if t.kernel in NETWORK and (t.kernel, t.tp) not in have
                 and (t.kernel is not Kernel.ALLREDUCE or t.tp in tps))
    if not fill:
        return prof
    modelled = {f"{t.kernel.value}" + (f" tp={t.tp}" if t.kernel is Kernel.ALLREDUCE else ""): base.source
                for t in fill}
    return replace(prof, tables=prof.tables + fill, provenance=prof.provenance | {"modelled_tables": modelled})
