"""Linear layers of the built-in backend: few rows on the CPU decode kernels (``runner.cpu_kernels``), oneDNN on a
prepacked weight where that is faster, ``F.linear`` otherwise."""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from runner import cpu_kernels

_ONEDNN = torch.backends.mkldnn.is_available()
_ONEDNN_BF16 = _ONEDNN and torch.ops.mkldnn._is_mkldnn_bf16_supported()
_HALF = (torch.bfloat16, torch.float16)

_PACK_MIN_PARAMS = 2 ** 18
"""fp32 weights smaller than this stay on ``F.linear``: oneDNN's call costs 30-60 us before it computes."""


def _packed_dtype(x: Tensor, weight: Tensor) -> torch.dtype | None:
    """The dtype ``x @ weight.T`` runs in on a oneDNN-prepacked weight (CPU, inference), or None for ``F.linear``.

    NOTE (torch 2.13, AVX2 EPYC, 1-2 threads): a call on a weight reordered once into oneDNN's blocked layout
    costs 30-60 us before it computes, where ``F.linear`` costs 3-6 us.
    - fp32: packed from 8 rows on for weights of at least ``_PACK_MIN_PARAMS`` (2048x256 at 8 rows: 137 vs 206
      us; SmolLM2's 3072x576 at 32 rows: 1.4 vs 4.1 ms); smaller ones and single rows stay on ``F.linear``
      (a 128x64 weight: 61 vs 6 us at one row).
    - bf16 where the CPU has bf16 instructions (AVX-512 BF16, AMX): packed bf16 always (a GEMV streams 1.5x
      faster than ``F.linear``).
    - half precision where it has none: torch emulates the GEMM, whose time grows with the rows (SmolLM2's 121
      weights: 25 ms at one row, 161 ms at 8, against 70 ms packed in fp32; batch 32: 89 % of a 648 ms step).
      One row still streams the half weights (half the bytes); two or more are multiplied in fp32 on a packed
      fp32 copy: the products of half values are exact in fp32 and accumulated in fp32, as a native half GEMM
      does, and the output is rounded to the model's dtype.
    """
    if weight.dtype != x.dtype or torch.is_grad_enabled():
        return None
    packed = packed_weight_dtype(x.dtype, x.device)
    if packed is None or packed == x.dtype == torch.bfloat16:
        return packed
    rows = x.numel() // x.shape[-1]
    if x.dtype == torch.float32:
        return packed if rows >= 8 and weight.numel() >= _PACK_MIN_PARAMS else None
    return packed if rows >= 2 else None  # half weights without half instructions


def packed_weight_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype | None:
    """The dtype of the oneDNN-prepacked copy of the Linear weights a model of ``dtype`` keeps on ``device`` (an
    extra copy of each Linear weight, built on its first packed call), or None where it keeps none (GPUs).
    ``_packed_dtype`` says when each copy is used; the profiler records this so that plans count its memory (for
    every Linear weight: fp32 weights below ``_PACK_MIN_PARAMS`` never get one, so small models are
    over-counted, on the safe side)."""
    if not _ONEDNN or device.type != "cpu":
        return None
    if dtype == torch.bfloat16 and _ONEDNN_BF16:
        return torch.bfloat16
    return torch.float32 if dtype == torch.float32 or dtype in _HALF else None


def prepacked_linear(owner: nn.Module, linears: tuple[nn.Linear, ...], x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` through ``linears`` side by side (their outputs concatenated) on one oneDNN-prepacked weight of
    ``dtype`` (``_packed_dtype``); the output is in ``x``'s dtype.

    NOTE: the packed copy lives on ``owner`` and is rebuilt whenever a weight is replaced (``apply_tp``) or
    written in place (its version changes). It costs one extra copy of the weights in memory (two for half
    weights packed in fp32).
    """
    packed = owner.__dict__.get("_prepacked")
    if packed is not None:  # the per-call check is on the decode path: plain attribute reads only
        for (ref, version), lin in zip(packed[0], linears):
            w = lin._parameters["weight"]
            if ref() is not w or w._version != version:
                packed = None
                break
    if packed is None or len(packed[0]) != len(linears) or packed[1].dtype != dtype:
        weights = [lin._parameters["weight"] for lin in linears]
        weight = torch.cat(weights) if len(weights) > 1 else weights[0]
        bias = None if linears[0].bias is None else torch.cat([lin.bias for lin in linears]).detach().to(dtype)
        packed = (tuple((weakref.ref(w), w._version) for w in weights),
                  torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype)), bias)
        owner.__dict__["_prepacked"] = packed
    if x.dtype == dtype:
        return torch.ops.mkldnn._linear_pointwise(x, packed[1], packed[2], "none", [], "")
    return torch.ops.mkldnn._linear_pointwise(x.to(dtype), packed[1], packed[2], "none", [], "").to(x.dtype)


class Linear(nn.Linear):
    """``nn.Linear`` that runs few rows on the CPU decode kernels (``runner.cpu_kernels``; from 9 rows on with the
    weight's panels, built on first use) and multiplies by a prepacked weight where that is faster
    (``prepacked_linear``). ``residual``, when given, is added to the output
    (``residual + linear(x)``, fused into the kernel)."""

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        if cpu_kernels.usable(x, self.weight, *_bias(self)):
            panels = cpu_kernels.cached_panels(self, self.weight) if cpu_kernels.wants_panels(x) else None
            return cpu_kernels.linear(x, self.weight, self.bias, residual, panels)
        dtype = _packed_dtype(x, self.weight)
        y = prepacked_linear(self, (self,), x, dtype) if dtype is not None else F.linear(x, self.weight, self.bias)
        return y if residual is None else residual + y


def _bias(*linears: nn.Linear) -> tuple[Tensor, ...]:
    return tuple(lin.bias for lin in linears if lin.bias is not None)
