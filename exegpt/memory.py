"""Device memory: weights + KV cache + activation workspace per stage device.

The KV cache is preallocated per row at the longest context a query can reach (longest prompt +
longest output), as the runner's static cache is, so a schedule that fits here fits at run time; it is counted
at the backend's cache precision (``ModelShape.kv_dtype``, from ``Profile.kv_dtype``: the runner keeps fp32 KV
for half-precision models on a CPU). Weights count the backend's extra copies of every Linear weight where it
keeps them (``ModelShape.packed_dtype`` and ``panel_dtype``, from ``Profile.packed_weight_dtype`` and
``panel_weight_dtype``: the runner on a CPU).
Decoder-only WAA holds two copies of the weights: one on the encode group, one on the decode group.
A schedule whose peak exceeds ``memory_fraction`` of device memory is infeasible, never clamped.
"""

from __future__ import annotations

import functools

import numpy as np

from .models import ModelShape

MEMORY_FRACTION = 0.9  # of device memory usable by weights, KV cache and activations


def stage_weight_bytes(model: ModelShape, tp: int, n_layers: int, n_enc_layers: int,
                       first: bool, last: bool) -> float:
    """Weight bytes on one device of a stage (with the backend's extra copies of the Linear weights: the layers'
    and the LM head's)."""
    emb = model.vocab_size * model.dim * model.dtype_bytes
    pos = model.max_seq_len * model.dim * model.dtype_bytes if model.family == "opt" else 0
    w = n_layers * model.layer_bytes(tp) + n_enc_layers * model.encoder_layer_bytes(tp)
    if first:
        w += emb + pos
    if last:
        head = model.vocab_size * model.dim * model.copies_bytes_per_param  # the LM head's extra copies
        w += (0 if first and model.tied_embeddings else emb) + head
    return w


@functools.lru_cache(maxsize=4096)  # the grid searches price the same few kinds of stage thousands of times
def stage_weights(model: ModelShape, stage, first: bool, last: bool) -> float:
    """Weight bytes on one device of ``stage`` (an ``exegpt.stages.Stage``): its TP shard, and with Shift
    Parallelism (``stage.sp > 1``) the base configuration's shard beside it (W/TP + W/P, Arctic's two models)."""
    w = stage_weight_bytes(model, stage.tp, stage.n_layers, stage.n_enc_layers, first, last)
    if stage.sp > 1:
        w += stage.n_layers * model.layer_bytes(stage.tp // stage.sp)
    return w


def kv_bytes(model: ModelShape, tp: int, n_layers: int, rows, max_ctx: int, max_input: int):
    """Preallocated KV-cache bytes on one device of a stage holding ``n_layers`` decoder layers."""
    per_row = max_ctx * model.kv_bytes_per_token(tp) + max_input * model.cross_kv_bytes_per_token(tp)
    return np.asarray(rows, dtype=float) * per_row * n_layers


def activation_bytes(model: ModelShape, tp: int, tokens):
    """Peak activation workspace for a forward pass over ``tokens`` tokens (hidden, residual,
    q/k/v and the MLP intermediate of one layer at a time)."""
    width = 4 * model.dim + (3 * model.n_heads * model.hd + 2 * model.ffn_dim) / tp
    return np.asarray(tokens, dtype=float) * width * model.dtype_bytes
