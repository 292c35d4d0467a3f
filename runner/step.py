"""What every layer of one prefill, prompt-chunk or decode call shares (``Step``), and the RoPE tables it reads."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from runner import cpu_kernels
from runner.kv_cache import row_index


def rope_tables(head_dim: int, max_len: int, base: float, dtype: torch.dtype, device: torch.device
                ) -> tuple[Tensor, Tensor]:
    """cos and signed sin ``[max_len, head_dim]`` in HF's rotate_half layout (each frequency twice: halves, not
    pairs). The sin table carries rotate_half's sign (``-sin`` on the first half), so ``apply_rope`` is one roll."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))  # [D/2]
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # [S, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [S, D]
    sign = torch.cat([-torch.ones(head_dim // 2), torch.ones(head_dim // 2)])  # [D]
    return emb.cos().to(device, dtype), (emb.sin() * sign).to(device, dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE of ``x`` ``[..., D]`` with ``cos`` and signed ``sin`` (``rope_tables``) broadcast to it.

    ``rotate_half(x) * sin`` of HF is ``cat(-x2, x1) * sin`` = ``roll(x, D/2) * signed_sin``: the same bits.
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


@dataclass(frozen=True, slots=True)
class Step:
    """What every layer of one prefill or decode call shares."""

    rows: Tensor | slice
    """Cache rows: a slice when consecutive (cache views, no copies), else a LongTensor ``[n]`` on the device."""
    decode: bool
    pos: Tensor | None = None
    """Decode: per-row positions ``[n]`` (device)."""
    pos_uniform: int | None = None
    """Decode: the position every row is at, when they all share one (the cache write is then a plain copy)."""
    kv_len: int = 0
    """Decode: keys to attend to, ``max(pos) + 1``."""
    mask: Tensor | None = None
    """Boolean attention mask (True = attend) ``[n, 1, S, kv]``; None with ``is_causal`` or when all keys count."""
    is_causal: bool = False
    cos: Tensor | None = None
    """RoPE cos and signed sin, broadcastable to ``[n, S, heads, D]`` (prefill ``[S, 1, D]``, decode
    ``[n, 1, 1, D]``)."""
    sin: Tensor | None = None
    cross_mask: Tensor | None = None
    """T5 decoder: boolean mask of the encoder positions ``[n, 1, 1, cross_len]``."""
    cross_len: int = 0
    kernel_args: tuple | None = None
    """CPU decode: ``cpu_kernels.step_args`` of this step (arguments, the tensors they point to), taken once for
    every fused layer."""
    chunk: tuple[list[int], list[int], list[int]] | None = None
    """Chunked prefill: (cache rows, start positions, chunk lengths) as host lists; the chunk's keys and values go
    to ``[start, start + length)`` of each row, and its queries attend the row's keys before them (``mask``)."""


def prefill_step(seq_lens: Tensor, rows: Tensor, rope: tuple[Tensor, Tensor] | None, device: torch.device
                 ) -> Step:
    """The ``Step`` of prompts of ``seq_lens`` (CPU ``[n]``) padded on the right to the longest, into cache ``rows``
    (CPU ``[n]``), attending causally. That needs no padding mask: a prompt's query at position i attends keys
    0..i, all of them its own tokens; the padded positions' outputs are never read, and their cached keys and
    values are overwritten by decoding or masked past each row's position. (A ``[n, 1, S, S]`` mask would cost
    n S^2 bytes, and on CUDA keep grouped-query attention off the flash kernel.)"""
    S = int(seq_lens.max())
    cos = sin = None
    if rope is not None:
        cos, sin = rope[0][:S, None], rope[1][:S, None]  # [S, 1, D]
    return Step(rows=row_index(rows, device), decode=False, is_causal=True, cos=cos, sin=sin)


def chunk_step(starts: Tensor, seq_lens: Tensor, rows: Tensor, rope: tuple[Tensor, Tensor] | None,
               device: torch.device) -> Step:
    """The ``Step`` of prompt chunks of ``seq_lens`` tokens (CPU ``[n]``, padded on the right to the longest) that
    continue rows ``rows`` at positions ``starts``: query q of row i sits at ``starts[i] + q`` and attends keys
    ``0 .. starts[i] + q`` of its row."""
    S = int(seq_lens.max())
    kv = int((starts + seq_lens).max())
    pos = starts[:, None] + torch.arange(S)[None, :]  # [n, S]
    mask = (torch.arange(kv)[None, None, :] <= pos[:, :, None])[:, None].to(device)  # [n, 1, S, kv]
    cos = sin = None
    if rope is not None:
        at = pos.clamp(max=rope[0].shape[0] - 1).to(device)  # padded queries past the table: never read
        cos, sin = rope[0][at][:, :, None], rope[1][at][:, :, None]  # [n, S, 1, D]
    return Step(rows=row_index(rows, device), decode=False, kv_len=kv, mask=mask, cos=cos, sin=sin,
                chunk=(rows.tolist(), starts.tolist(), seq_lens.tolist()))


def decode_step(pos: Tensor, rows: Tensor | slice, rope: tuple[Tensor, Tensor] | None, device: torch.device,
                pos_d: Tensor | None = None) -> Step:
    """The ``Step`` of one decode token per row at positions ``pos`` (CPU ``[n]``; ``pos_d`` the same on the
    device, if the caller has it) in cache ``rows`` (CPU ``[n]`` or a slice)."""
    kv_len = int(pos.max()) + 1
    uniform = int(pos.min()) == kv_len - 1
    pos_d = pos.to(device) if pos_d is None else pos_d
    mask = None
    if not uniform:  # rows at different positions: each sees only its own prefix
        mask = (torch.arange(kv_len)[None, :] <= pos[:, None])[:, None, None].to(device)  # [n, 1, 1, kv]
    cos = sin = None
    if rope is not None:
        at = slice(kv_len - 1, kv_len) if uniform else pos_d
        cos, sin = rope[0][at][:, None, None], rope[1][at][:, None, None]  # [n or 1, 1, 1, D]
    rows = rows if isinstance(rows, slice) else row_index(rows, device)
    kernel_args = cpu_kernels.step_args(cos, sin, pos_d, rows) if device.type == "cpu" and cpu_kernels.load() \
        else None
    return Step(rows=rows, decode=True, pos=pos_d, pos_uniform=kv_len - 1 if uniform else None, kv_len=kv_len,
                mask=mask, cos=cos, sin=sin, kernel_args=kernel_args)
